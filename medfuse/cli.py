"""The ``medfuse`` command line: info, register, resample, fuse, measure, evaluate, train, batch, demo.

Every failure on bad input prints one line (file, problem, fix) and exits with 2, also a file-system error
(permission denied, read-only, disk full, missing path) that a step did not type; ``--debug`` shows the
traceback. Ctrl-C (or SIGTERM, as a scheduler sends at a time limit) exits with 130 and says which outputs
were kept. Exit codes are listed in ``medfuse --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import shlex
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ._checks import MAX_THREADS, did_you_mean, label
from .errors import CancelledError, InvalidInputError, MedfuseError, MedfuseWarning
from .fusion.classical import METHODS as _CLASSICAL_METHODS

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURES", "EXIT_USAGE", "EXIT_INTERNAL", "EXIT_CANCELLED"]

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_CANCELLED = 130

_METHODS = ("network", *_CLASSICAL_METHODS)  # one list: a rule added to classical.METHODS is offered here too
_KINDS = ("none", "rigid", "affine", "deformable")

_DESCRIPTION = """\
Multimodal fusion of 3-D medical volumes (CT, MR, PET, SPECT).

Start here (the paths are the repository's bundled sample_volumes/):
  medfuse demo                                   # fuse the bundled sample MR + PET, write NIfTI + PNG
  medfuse info sample_volumes                    # what is in a file or folder (series, files, SUV)
  medfuse fuse sample_volumes/mr_t1.nii.gz sample_volumes/pet -o fused.nii.gz --register rigid
  medfuse batch subjects.csv --workers 4         # your manifest: many subjects in parallel (Dask; medfuse batch --help)

Inputs are NIfTI/MetaImage/NRRD files or DICOM folders. The first image (FIXED) is the
reference: outputs are on its grid. Every output of fuse, register, resample, batch and demo gets a
provenance sidecar (x.nii.gz -> x.json): versions, input and output SHA-256, registration report,
steps and timings; never patient identifiers (evaluate records its run in metrics.json instead).
Outputs are never written over an existing file unless --overwrite is given (medfuse demo
rewrites its own files in its own folder).
"""

_EPILOG = """\
exit codes:
  0    success
  1    some subjects (batch) or pairs (evaluate) failed and were skipped; the others are written
  2    bad usage or bad input (missing file, unreadable image, output exists, ...)
  3    internal error (a bug: please report it, with the output of --debug)
  130  cancelled (Ctrl-C or SIGTERM), whenever it came; the message names the outputs this run had completed
       (kept: every write is atomic) and those it did not write

Run 'medfuse COMMAND --help' for a command's options. Add --debug to any command to see
the full traceback of an error.
"""


# ----------------------------------------------------------------------------- helpers
class _Parser(argparse.ArgumentParser):
    """argparse that suggests the nearest choice on a typo (``--method lapacian``: did you mean 'laplacian'?), and
    says a usage error in one line (problem, fix) without echoing a path-like value (:func:`medfuse._checks.label`).

    Why: argparse repeated any bad value verbatim (``--method /data/DOE^JOHN/x``: a patient's name on the screen and
    in logs) under a multi-line usage block, unlike every other error of the command line.
    """

    def error(self, message: str):  # type: ignore[override]
        fix = f"see '{self.prog} --help'"
        m = re.match(r"(.*?)invalid choice: (.*) \(choose from (.*)\)$", message, re.S)
        if m:
            word = _argparse_value(m.group(2))
            choices = [c.strip().strip("'\"") for c in m.group(3).split(",")]
            message = f"{m.group(1)}invalid choice {label(word) if isinstance(word, str) else '(not shown)'}"
            message += did_you_mean(word, choices)  # a plain word: a typo may have a near choice
            fix = f"use one of {', '.join(choices)}"
        m = re.match(r"(.*invalid \w+ value: )(.*)$", message, re.S)
        if m:  # --threads /data/DOE^JOHN
            word = _argparse_value(m.group(2))
            message = m.group(1) + (label(word) if isinstance(word, str) else "(not shown)")
        if message.startswith("unrecognized arguments: "):
            words = message[len("unrecognized arguments: "):].split(" ")
            message = "unrecognized arguments: " + " ".join(label(w) for w in words)
        if self._dash_named_file():
            fix = ("write a file name that starts with - as ./-NAME (e.g. ./-t1.nii.gz), or give the options first, "
                   f"then --, then the file names; {fix}")
        # One line, as the command line's other errors (the usage block is in --help).
        end = "" if message.endswith(("?", ".")) else "."
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}{end} Fix: {fix}.\n")

    #: The command line being parsed (set by :func:`_main`): its words are looked at for a file named ``-…``.
    given: Sequence[str] = ()

    def _dash_named_file(self) -> bool:
        """Whether a word of the command line that argparse took for an option names a file: one that exists, or
        ends as an image does (``medfuse info -t1.nii.gz`` said only "the following arguments are required")."""
        for word in self.given:
            if word in ("-", "--") or not word.startswith("-") or word.startswith("--"):
                continue
            with contextlib.suppress(OSError, ValueError):
                if os.path.lexists(word):
                    return True
            if word[:2] not in self._option_string_actions and word.lower().endswith(_NAMED_ENDINGS):
                return True
        return False


#: Endings of the files the commands read and write (a word ending so is a file name, not an option).
_NAMED_ENDINGS = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".hdr", ".img", ".dcm", ".tfm", ".h5",
                  ".json", ".csv", ".tsv", ".png", ".pt")


def _argparse_value(quoted: str) -> Any:
    """The value argparse quoted in its message (its ``repr``), or None when it is not one."""
    import ast

    try:
        return ast.literal_eval(quoted)
    except (ValueError, SyntaxError):
        return None


def _bounded_count(maximum: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 1 to ``maximum``.

    Why: ``--threads 99999999999999999999`` reached SimpleITK and ended in an OverflowError (exit 3, "internal
    error"); a count that large is a usage error.
    """

    def count(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = None
        if n is None or not 1 <= n <= maximum:
            raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {maximum}, got {label(text)}")
        return n

    return count


def _cli_error(e: MedfuseError, series: Optional[Mapping[Any, Any]] = None) -> MedfuseError:
    """The same error with a fix that names command-line options, not Python arguments
    (``overwrite=True`` -> ``--overwrite``; ``series_uid=``/``volume_index=`` -> what the command line can do).

    ``series``: each input's ``--series`` choice, by its path (a 4-D series picked in a folder of several)."""
    from .errors import MultipleSeriesError

    fix = e.fix
    if isinstance(e, MultipleSeriesError):
        if "4-D" in e.problem:
            where = repr(os.fspath(e.path)) if e.path else "'PATH'"
            pick = _series_picked(series, e.path)
            n = len(e.choices) if isinstance(getattr(e, "choices", None), list) and e.choices else 0
            fix = (f"add --volume N to use volume N (0..{n - 1 if n else 'N'}; 'medfuse info' says what each is), "
                   "or --volume sum (a gated SPECT's counts) or --volume mean (a gated PET, a dynamic series' "
                   "frames) for all of them as one; or save the one you want as its own file first, e.g. python -c "
                   f"\"import medfuse; {_volume_loader(where, pick)}; medfuse.save(v, 'vol0.nii.gz')\""
                   + (", N being the series' number (as text, e.g. '2') as 'medfuse info FOLDER' lists it"
                      if pick == "N" else ""))
        else:
            fix = ("pick one with --series: its number as listed or its modality (fuse and register: one per "
                   "input, FIXED first, '-' for an input that needs none, e.g. --series CT PT), or give the folder "
                   "of one series ('medfuse info FOLDER' lists the series and their folders)")
    elif fix and ("volume_index=" in fix or "combine='" in fix):  # a volume choice: the command line's option
        e.problem = re.sub(r"\bvolume_index (-?\d+)", r"--volume \1", e.problem)
        fix = re.sub(r" ?\(command line: --volume \w+\)", "", fix)
        fix = re.sub(r"pass volume_index=(\S+)", r"give --volume N (N from \1)", fix)
        fix = re.sub(r"(?:pass )?combine='(\w+)'", r"--volume \1", fix)
    elif fix and "overwrite=True" in fix:
        fix = fix.replace("pass overwrite=True (--overwrite)", "add --overwrite")  # advice for both faces
        fix = fix.replace("pass overwrite=True", "add --overwrite").replace("overwrite=True", "--overwrite")
    if fix:  # advice giving both forms, "medfuse.f(...) (command line: medfuse f ...)": the command line's alone
        fix = re.sub(r"medfuse\.\w+\([^()]*\) \(command line: ([^()]*)\)", r"\1", fix)
    if fix and "initialise='" in fix:  # registration advice: the options of `medfuse register`
        fix = re.sub(r"(?:pass |try )?initialise='(\w+)'", r"medfuse register --initialise \1", fix)
        fix = fix.replace("initial_transform= a known rough alignment",
                          "--initial-transform FILE (a known rough alignment)")
    if fix and ", or pass format='dicom'" in fix:  # the command line picks the format by the name alone
        fix = fix.replace(", an existing series folder, or pass format='dicom'", " or an existing series folder")
    if fix:
        fix = _cli_words(_fusion_options(fix))
    if fix and "result.linear_transform of the run that made it" in fix:  # a Python attribute
        fix = fix.replace("result.linear_transform of the run that made it",
                          "the .tfm of 'medfuse register --kind affine' on the same pair")
    if fix == "check the path" and e.path is not None and "sample_volumes" in Path(e.path).parts \
            and not Path(e.path).exists():
        # The examples' paths are the repository's: a pip install has no sample_volumes/ (it can write them).
        fix = ("sample_volumes/ comes with the repository; write the same synthetic samples here with "
               "'python -m medfuse.phantom --write sample_volumes' (medfuse demo writes them to "
               "demo_output/sample_volumes)")
    problem = _fusion_options(e.problem)
    if fix != e.fix or problem != e.problem:
        e.fix, e.problem = fix, problem
        e.args = (e._compose(),)
    return e


def _series_by_input(args: argparse.Namespace) -> Dict[Any, Any]:
    """Each input's ``--series`` choice by its path (fuse and register: FIXED first), for :func:`_cli_error`."""
    moving = getattr(args, "moving", None)
    inputs = [getattr(args, "fixed", None), *(moving if isinstance(moving, list) else [moving])]
    series = getattr(args, "series", None)
    if not isinstance(series, list):
        return {}
    out: Dict[Any, Any] = {}
    for given, pick in zip(inputs, series):
        key = os.path.abspath(os.fspath(given)) if given is not None else None
        # One folder given twice with two picks: which one failed is not known here.
        out[key] = pick if out.get(key, pick) == pick else "N"
    return out


def _series_picked(series: Optional[Mapping[Any, Any]], path: Any) -> Optional[str]:
    """The ``--series`` choice given for the input at ``path`` (None: none, or '-')."""
    if not series or path is None:
        return None
    pick = series.get(os.path.abspath(os.fspath(path)))
    return None if pick in (None, "-") else str(pick)


def _volume_loader(where: str, pick: Optional[str]) -> str:
    """Python that loads volume 0 of the series ``pick`` (a --series choice: number, modality or UID) as ``v``.

    Why: ``medfuse.load(FOLDER, volume_index=0)`` alone, the advice for a 4-D series, is refused in a folder of
    several series, where the command line's ``--series`` had picked one (``series_uid=`` takes the same choices).
    """
    if pick is None:
        return f"v = medfuse.load({where}, volume_index=0)"
    return f"v = medfuse.load({where}, series_uid={'N' if pick == 'N' else repr(pick)}, volume_index=0)"


#: Python advice in medfuse's messages and the command line's own, for any command (see :func:`_cli_words`).
_CLI_ADVICE = (
    ("register and resample it onto volume 1's grid first: medfuse.register(fixed, moving).resampled or "
     "medfuse.resample(moving, fixed)",
     "register it onto the first image and pass the result instead: medfuse register FIRST SECOND -o "
     "SECOND_on_FIRST.nii.gz (it writes SECOND resampled onto FIRST's grid)"),
    ("numpy.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0), for a Volume v.with_array(numpy.nan_to_num("
     "v.array, nan=0.0, posinf=0.0, neginf=0.0)); or save the file with them set to 0",
     "save the image with them set to 0, in the program that made it or with python -c \"import medfuse, numpy; "
     "v = medfuse.load('IN.nii.gz'); medfuse.save(v.with_array(numpy.nan_to_num(v.array, nan=0.0, posinf=0.0, "
     "neginf=0.0)), 'OUT.nii.gz')\", and pass that file"),
    ("or fixed_mask=/moving_mask= to register the region both show",
     "or register the region both show with masks (the Python API's medfuse.register(..., fixed_mask=, "
     "moving_mask=))"),
    ("register the magnitude image: v.with_array(numpy.abs(v.array))",
     "register the magnitude image, saved as its own file first: python -c \"import medfuse, numpy; "
     "v = medfuse.load('IN.nii.gz'); medfuse.save(v.with_array(numpy.abs(v.array)), 'OUT.nii.gz')\""),
    ("load the whole series (medfuse.load(path, whole_series=True) when this file is one part of a DICOM series), "
     "or place it by the scanners' coordinates without registering: medfuse.resample(moving, fixed)",
     "pass the series folder when this file is one part of a DICOM series, or fuse it as the scanners placed it, "
     "without registering: medfuse fuse FIXED MOVING --register none -o OUT"),
    # Advice written for both faces: the option alone.
    (" (CLI: --overwrite)", ""),
    ("report= (--report)", "--report"),
    ("give body= for one PET only: load each PET with its own body= (medfuse.load(path, body=...)) and pass the "
     "Volumes, or leave it out",
     "leave them out with two DICOM PETs (each then uses its own header), or give them with one PET input only"),
    ("a moving -> fixed transform needs .inverse() first",
     "a moving -> fixed transform must be inverted first: python -c \"import medfuse; "
     "medfuse.load_transform('T.tfm').inverse().save('T_inverse.tfm')\""),
)


def _cli_words(text: str) -> str:
    """``text`` (a fix, or a whole one-line message) with Python advice put as the command line's."""
    from .errors import reworded

    text = _body_words(reworded(text, _CLI_ADVICE))
    # Options the command line does not have: "load it with suv='none'" (it loads an SUV it cannot compute as
    # stored, Bq/mL, with a warning already) and whole_series=True (it reads a folder whole) are left out.
    text = re.sub(r"[,;]? or load(?: it)? with suv='none'(?: to keep (?:Bq/mL|the stored values))?", "", text)
    text = re.sub(r"load it with suv='none' to keep the stored values", "re-export the series with its full PET "
                  "header", text)
    text = text.replace("(suv='auto')", "(--suv auto)")
    # evaluate's options under their Python names: val_fraction=0.2 is --val-fraction 0.2; min_content has none.
    text = text.replace("val_fraction=", "--val-fraction ").replace(", or lower min_content", "")
    return text.replace(" (or whole_series=True)", "")


def _body_words(text: str) -> str:
    """``body=`` (load's PET weight, height and sex) in ``text`` as the options that give it: "body= gave
    weight_kg in place of ..." -> "--weight-kg given in place of ...", "body= was not used" -> "--weight-kg,
    --height-m and --sex were not used"."""
    text = re.sub(r"\bbody= gave ([a-z_, ]+?) in place",
                  lambda m: ", ".join("--" + k.strip().replace("_", "-") for k in m.group(1).split(",")) +
                  " given in place", text)
    text = text.replace("body= was not used: it gives", "--weight-kg, --height-m and --sex were not used: they give")
    return text.replace("body= was not used", "--weight-kg, --height-m and --sex were not used")


def _fusion_options(text: str) -> str:
    """The fusion's Python arguments in ``text`` as the command's options: ``weights=`` -> ``--weights``,
    ``method='max'`` (and ``method is 'max'``) -> ``--method max``."""
    text = re.sub(r"\bweights=(?=['\"])", "--weights ", text).replace("weights=", "--weights")
    text = re.sub(r"method='(\w+)'", r"--method \1", text)
    return re.sub(r"method is '(\w+)'", r"--method is \1", text)


class _Bar:
    """A tqdm progress bar fed by medfuse's ``progress(fraction, message)`` callbacks.

    Redrawn at most every :attr:`MIN_INTERVAL` seconds (it was redrawn on every callback, 15 to 38 times a
    second: a screen reader or braille display read each one), fitted to the terminal's width (a narrow one, a
    40-cell braille line, gets the percentage and the message without the bar drawing), ``#`` blocks where the
    locale or stream cannot show the Unicode ones, and no bar under ``MEDFUSE_NO_PROGRESS``, ``TQDM_DISABLE`` or
    ``TERM=dumb`` (:func:`medfuse.progress.text_bar_allowed`). A bar that cannot be built (a bad ``TQDM_*``
    setting) is no bar: it never fails the command.
    """

    #: Seconds between two redraws at least.
    MIN_INTERVAL = 0.5
    #: Narrowest bar drawing, and the room a message keeps beside it; a terminal narrower than both gets none.
    _MIN_BAR, _MIN_MESSAGE = 10, 30
    _CLOCK = 7  # "1:02:03"
    _now = staticmethod(time.monotonic)

    def __init__(self, desc: str, *, enabled: Optional[bool] = None):
        from .progress import text_bar_allowed, text_bar_ascii

        self.bar: Any = None
        self._desc, self._message, self._last = desc, "", None
        if enabled is False or (enabled is None and not text_bar_allowed()):
            return
        try:
            from tqdm import tqdm

            # disable=None: tqdm hides itself when stderr is not a terminal (logs, CI).
            shape, shown, _ = self._layout()
            self.bar = tqdm(total=100, desc=shown, unit="%", file=sys.stderr, leave=False,
                            disable=None if enabled is None else not enabled, ascii=text_bar_ascii(sys.stderr),
                            bar_format=shape, ncols=self._columns() - 1, dynamic_ncols=False,
                            mininterval=self.MIN_INTERVAL)
        except Exception:  # noqa: BLE001 - a broken bar must not lose a result, nor stop the work starting
            self._drop()

    @staticmethod
    def _columns() -> int:
        """The terminal's width (stderr's), else ``COLUMNS``, else 80; a 0x0 terminal (``script -c``) is unknown."""
        try:
            columns = os.get_terminal_size(sys.stderr.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        if columns <= 0:
            try:
                columns = int(os.environ.get("COLUMNS", ""))
            except ValueError:
                columns = 0
        return columns if columns > 0 else 80

    def _layout(self) -> Tuple[str, str, int]:
        """The ``bar_format``, the description and the message's room for the terminal's width: the bar drawing
        when the message keeps :attr:`_MIN_MESSAGE` characters beside it, else the narrow layout."""
        from .progress import TEXT_BAR_FORMAT, TEXT_BAR_FORMAT_NARROW

        width = self._columns() - 1  # the last cell left free: some terminals wrap there
        room = width - len(self._desc) - len(": 100%|| ") - self._CLOCK - len(", ") - self._MIN_BAR
        if room >= self._MIN_MESSAGE:
            return TEXT_BAR_FORMAT, self._desc, room
        short = self._desc.split(" ")[0]  # "register (rigid)": the message names the kind ("rigid: level 2/3")
        return TEXT_BAR_FORMAT_NARROW, short, width - len("100% ") - len(short) - len(", ")

    def _fit(self) -> None:
        """Lay the bar out for the terminal's width now (it may have changed) and cut the message to fit."""
        from .progress import cut_at_word

        self.bar.bar_format, self.bar.desc, room = self._layout()
        self.bar.ncols = self._columns() - 1
        self.bar.set_postfix_str(cut_at_word(self._message, max(room, 0)), refresh=False)

    def __call__(self, fraction: float, message: str = "") -> None:
        if self.bar is None:
            return
        try:
            self.bar.n = round(100 * float(fraction), 1)
            if message:
                self._message = " ".join(message.split())
            now = self._now()
            if self._last is None or now - self._last >= self.MIN_INTERVAL or fraction >= 1.0:
                self._fit()
                self.bar.refresh()
                self._last = now
        except Exception:  # noqa: BLE001 - drawing failed once: no bar from now on, the work goes on
            self._drop()

    def _drop(self) -> None:
        bar, self.bar = self.bar, None
        if bar is not None:
            try:
                bar.close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _warning_signals() -> tuple:
    """SIGUSR1/SIGUSR2 where their action is still the default one (which ends the process on the spot).

    Why: SLURM (its signal option, USR1@60) and other schedulers send one as a notice before the time limit;
    it killed a batch with no summary and its report rows ``pending`` for good. A program that set its own
    action for them (or ignores them: nohup-like wrappers) keeps it.
    """
    if not _CONSOLE[0]:
        # A program calling main([...]) keeps its own: getsignal() says SIG_DFL for a handler set from C too
        # (faulthandler.register(SIGUSR1), to dump a hung job's stacks), which restoring SIG_DFL would wipe out.
        return ()
    found = []
    for name in ("SIGUSR1", "SIGUSR2"):
        s = getattr(signal, name, None)
        try:
            # _TermAsInterrupt's own handler too: main() runs every command inside it, and _CancelOnSigint
            # nested there must take the signal over (the first SIGUSR1 stopped the command at once).
            if s is not None and signal.getsignal(s) in (signal.SIG_DFL, _raise_interrupt):
                found.append(s)
        except ValueError:  # pragma: no cover - not a signal here
            pass
    return tuple(found)


#: Whether this process is the ``medfuse`` console script (main() called without argv): only then does medfuse
#: take SIGUSR1/SIGUSR2 (see :func:`_warning_signals`).
_CONSOLE = [False]


def _raise_interrupt(signum, frame):
    """The handler :class:`_TermAsInterrupt` installs: the signal raises KeyboardInterrupt, as Ctrl-C does."""
    raise KeyboardInterrupt


class _CancelOnSigint:
    """First Ctrl-C (SIGINT) or SIGTERM sets a CancelToken (the operation stops cleanly at its next check); a
    second one raises KeyboardInterrupt at once.

    SIGTERM is what job schedulers send at a time limit (SLURM, then SIGKILL after its grace time) and what
    ``kill`` sends: before, it ended the process on the spot, so a batch report kept its subjects ``pending``
    and the command said nothing.

    A Ctrl-C that came after the operation's last check (during its final save, say) did not stop it; leaving the
    block then raises :class:`CancelledError` anyway (``raise_on_exit``), so that the command exits with 130,
    not 0, and says what it kept.
    """

    _SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)

    def __init__(self, *, raise_on_exit: bool = True):
        from .progress import CancelToken

        self.token = CancelToken()
        self._old: dict = {}
        self._raise_on_exit = raise_on_exit

    def _handler(self, signum, frame):
        if self.token.cancelled:
            raise KeyboardInterrupt
        self.token.cancel()
        if signum == getattr(signal, "SIGTERM", None):
            print("\nmedfuse: cancelling on SIGTERM (a time limit or kill)... (a second one stops at once)",
                  file=sys.stderr)
        elif signal.Signals(signum).name in ("SIGUSR1", "SIGUSR2"):
            print(f"\nmedfuse: cancelling on {signal.Signals(signum).name} (a scheduler's warning before its time "
                  "limit)... (a second one stops at once)", file=sys.stderr)
        else:
            print("\nmedfuse: cancelling... (press Ctrl-C again to stop at once)", file=sys.stderr)

    def __enter__(self):
        for s in self._SIGNALS + _warning_signals():
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. called from a test runner thread)
                break
        return self.token

    def __exit__(self, exc_type, exc, tb):
        for s, old in self._old.items():
            # None: the earlier handler was not set from Python (a C extension's); the default is the nearest.
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        self._old = {}
        if exc_type is None and self._raise_on_exit and self.token.cancelled:
            raise CancelledError("cancelled (Ctrl-C or SIGTERM) after the work had finished")
        return False


def _identity(p: Path) -> Optional[tuple]:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


class _Outputs:
    """A command's output paths, to say after Ctrl-C which of them this run wrote (each write is atomic, so a
    written file is complete) and which it did not (left as they were)."""

    def __init__(self, *paths: Any):
        self.before = {Path(p): _identity(Path(p)) for p in paths}
        self.marked: Dict[Path, Optional[tuple]] = {}

    def mark(self, path: Any) -> None:
        """Record that this run has just written ``path`` (its file as it is now)."""
        self.marked[Path(path)] = _identity(Path(path))

    def written(self) -> List[Path]:
        """The outputs this run wrote: those it marked and that are still the file it wrote; for a command that
        marks none (its writes happen in the pipeline), those changed since it started."""
        if self.marked:
            return [p for p, own in self.marked.items() if own is not None and _identity(p) == own]
        return [p for p, was in self.before.items() if _identity(p) not in (None, was)]

    def own(self) -> List[Path]:
        """The outputs this run marked and that are still what it wrote: the only files it may take back. A
        change alone is not enough: another run writing the same output meanwhile made its files look like
        this run's, and a failed run deleted them."""
        return [p for p, own in self.marked.items() if own is not None and _identity(p) == own]

    def note(self) -> str:
        """What a cancelled run kept, in one sentence."""
        done = self.written()
        if not done:
            return "nothing was written (files that were there before are unchanged)"
        rest = [p for p in self.before if p not in done]
        return (f"kept what was complete before the cancel: {', '.join(map(str, done))}"
                + (f"; not written: {', '.join(map(str, rest))}" if rest else ""))


def _cancelled_message(args: argparse.Namespace, error: Optional[BaseException] = None) -> str:
    outputs = getattr(args, "outputs", None)
    # A command whose outputs are not known up front (evaluate) says itself what it kept, on the error.
    note = outputs.note() if outputs is not None else getattr(error, "note", None)
    return f"medfuse {args.command}: cancelled" + (f"; {note}" if note else "")


def _lexists(path: Any) -> bool:
    """Whether anything, a broken link included, has this name; an error other than "no such file" (a name too
    long for the file system, permission denied on the way) is raised, for the command's own message."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


#: The arguments naming a file or folder to write (the inputs are :data:`_INPUT_ARGS`).
_OUTPUT_ARGS = frozenset({"output", "out", "transform", "report", "write_manifest", "weights"})


def _expand_home(args: argparse.Namespace) -> None:
    """Expand a leading ``~`` (the home folder) in the arguments naming files and folders, as the shell does
    for a word it sees unquoted (the Python API does not: :func:`medfuse.io._atomic.missing_hint` says so).

    Why: quoted (``-o '~/x/f.nii.gz'``) or after ``=`` (``--output=~/x``) the shell leaves it, and medfuse said
    "the output's folder does not exist. Fix: create the folder first": following that made a folder named ``~``.
    batch's manifest and folder paths were expanded already.
    """
    for name in (_INPUT_ARGS - {"rest"}) | _OUTPUT_ARGS:  # rest: evaluate's and train's own, which they parse
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v
                                 for v in value])


def _check_readable(*paths: Any) -> None:
    """Refuse, before any work, an input this user may not read (:func:`medfuse.io.check_readable`); missing
    paths are left to the readers, which say so with their own fix."""
    from .io import check_readable

    for path in paths:
        if path is not None and _lexists(path):  # a broken link too: it says loops or names its target
            check_readable(path)


#: What a user-fixable OSError that reached the command line means, and its fix (by errno).
_OS_ERRORS = {
    errno.EACCES: ("permission denied", "check the permissions (ls -l) or choose a path you may use"),
    errno.EPERM: ("operation not permitted", "check the permissions (ls -l) or choose a path you may use"),
    errno.EROFS: ("the file system is read-only", "write to a folder on a writable disk"),
    errno.ENOSPC: ("the disk is full", "free some space, or write to another disk"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path"),
    errno.EISDIR: ("a folder was given where a file was expected", "give the file"),
    errno.ENAMETOOLONG: ("the name or path is too long for the file system", "use a shorter name or folder path"),
}


def _os_error_message(e: OSError) -> Optional[str]:
    """One line for an OSError the user can fix (permission, read-only, disk full, missing path), else None."""
    known = _OS_ERRORS.get(e.errno)
    if known is None:
        return None
    from ._checks import cwd_gone

    if e.errno == errno.ENOENT and not e.filename and cwd_gone():
        return ("the current folder no longer exists (deleted or moved while the shell was in it). Fix: cd to an "
                "existing folder, or give absolute paths.")
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{known[0]}. Fix: {known[1]}."


def _shell_quote(path: Any) -> str:
    """``path`` quoted for a command the user may copy: POSIX shell quoting, or on Windows double quotes
    (``'C:\\My Data\\x'`` in single quotes is not one argument in cmd.exe)."""
    text = os.fspath(path)
    if text.startswith("-"):  # "medfuse info -export --series N" would read it as an option (Path drops "./")
        text = os.path.join(os.curdir, text)
    if os.name == "nt":
        import subprocess

        return subprocess.list2cmdline([text])
    return shlex.quote(text)


def _say(args: argparse.Namespace, *parts: Any) -> None:
    if not getattr(args, "quiet", False):
        # With --json standard output holds the one JSON object alone: the lines a person reads go to stderr.
        print(*(_scrubbed(p, args) if isinstance(p, str) else p for p in parts),
              file=sys.stderr if getattr(args, "json", False) else sys.stdout)


def _print_json(args: argparse.Namespace, record: Mapping[str, Any]) -> None:
    """``--json``: the command's one JSON object on stdout, the inputs' patient identifiers blanked as in every
    message (series UIDs kept, as info keeps them)."""
    print(json.dumps(_blank_listing(dict(record), args), indent=2, default=str))


def _kind(value: Optional[str]) -> Optional[str]:
    return None if value in (None, "none") else value


def _cli_advice(text: str, command: Optional[str]) -> str:
    """Registration advice written for the Python API, in the options of ``medfuse <command>``: "use
    initialise='auto'" printed by `medfuse register`, which has no such argument, sent users looking for one."""
    if command == "register":
        text = re.sub(r"initialise='(\w+)'", r"--initialise \1", text)
        text = re.sub(r"\bkind='(\w+)'", r"--kind \1", text)
        text = re.sub(r"\bmetric='(\w+)'", r"--metric \1", text)
    elif command in ("fuse", "batch", "demo"):
        text = re.sub(r"\bkind='(\w+)'", r"--register \1", text)
        # These runs search every orientation; the rest is `medfuse register`'s to change.
        text = re.sub(r"initialise='(\w+)'", r"medfuse register --initialise \1", text)
        text = re.sub(r"\bmetric='(\w+)'", r"medfuse register --metric \1", text)
        text = text.replace("register them first (medfuse.register, or --register rigid on the command line)",
                            "register them first: " + ("add --register rigid" if command == "fuse" else
                                                       "a register column or --register rigid" if command == "batch"
                                                       else "medfuse fuse --register rigid"))
    elif command == "resample":
        text = text.replace("register them first (medfuse.register, or --register rigid on the command line)",
                            "register them first (medfuse register REFERENCE MOVING -o OUT --transform T.tfm) and "
                            "pass --transform T.tfm")
        text = re.sub(r"\binterpolation='(\w+)'", r"--interpolation \1", text)  # the label-map warning's fix
    if command in ("register", "fuse", "batch", "demo"):
        text = text.replace(
            "medfuse.resample(labels, fixed, transform=result.transform, interpolation='nearest')",
            "write its transform (--transform T.tfm) and move the labels by nearest neighbour: medfuse resample "
            "FIXED LABELS --transform T.tfm --interpolation nearest -o LABELS_on_FIXED.nii.gz")
        text = text.replace("use a coarser bspline_grid_mm",
                            "use a coarser grid (the Python API's medfuse.register(..., bspline_grid_mm=))")
    return _cli_words(text)


def _show_warnings(caught: List[warnings.WarningMessage], args: Optional[argparse.Namespace] = None) -> None:
    """medfuse's warnings, one line each, with the inputs' patient identifiers blanked as in errors (a DICOM
    folder named after the patient was quoted in plain text by "1 file beside the series could not be read")."""
    for text in _warning_texts(caught, args):
        print(f"medfuse: warning: {text}", file=sys.stderr)


def _warning_texts(caught: Sequence[warnings.WarningMessage], args: Optional[argparse.Namespace] = None) -> List[str]:
    """medfuse's warnings among ``caught``, one line each, as :func:`_show_warnings` says them (``--json``
    lists them too)."""
    out = []
    for w in caught:
        if issubclass(w.category, MedfuseWarning):
            text = _cli_advice(" ".join(str(w.message).split()), getattr(args, "command", None))
            out.append(_scrubbed(text, args) if args is not None else text)
    return out


# ----------------------------------------------------------------------------- info
def _image_files(folder: Path) -> List[dict]:
    """The NIfTI/MetaImage/NRRD files under ``folder`` (recursive), with their size read from the header only."""
    from .io import is_image_file

    rows, unreadable = [], []
    found = []
    # os.walk, not rglob: rglob skipped a folder it may not list without a word, and a file in a folder it may
    # list but not enter raised PermissionError from is_file (the whole listing failed).
    for root, dirs, names in os.walk(folder, onerror=lambda e: unreadable.append(e.filename)):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # hidden: e.g. a killed write's .medfuse-tmp-*/
        found += [Path(root) / n for n in names if not n.startswith(".")]
    for f in sorted(found):
        try:
            if not f.is_file() or not is_image_file(f):
                continue
        except OSError:
            unreadable.append(f)
            continue
        low = f.name.lower()
        if low.endswith(".img") and f.with_suffix(".hdr").exists():  # an Analyze pair: list the .hdr only
            continue
        shape = None
        try:
            if low.endswith((".nii", ".nii.gz", ".hdr")):
                # nibabel reads the header whatever the name's case and bytes: ITK lower-cases the ending with
                # the C library's locale (tr_TR keeps "I"), and its binding cannot take a name that is not UTF-8.
                import nibabel as nib

                shape = [int(n) for n in nib.load(os.fspath(f)).shape]
            else:
                import SimpleITK as sitk

                from .io.nifti import _itk_readable

                with _itk_readable(f) as name:
                    reader = sitk.ImageFileReader()
                    reader.SetFileName(name)
                    reader.ReadImageInformation()
                    shape = list(reader.GetSize())
        except Exception:  # noqa: BLE001 - listed without a size; 'medfuse info FILE' says what is wrong
            pass
        rows.append({"file": os.fspath(f), "shape": shape})
    if unreadable:
        warnings.warn(MedfuseWarning(f"{len(unreadable)} file(s) or folder(s) under {folder} could not be read and "
                                     f"are not listed, e.g. {os.path.relpath(unreadable[0], folder)}: check their "
                                     "permissions (ls -l)"), stacklevel=2)
    return rows


def _series_key(series: list, choice: Any, folder: Path) -> Optional[str]:
    """The listed key of the series ``info`` described (what ``--series`` takes: ``UID#N`` where several series
    share a UID), or None when the folder listed none. The provenance holds the real SeriesInstanceUID, which
    such a folder's series share: ``--series 3 --json`` gave that, and giving it back to --series was refused."""
    if len(series) == 1:
        return series[0].series_uid
    if not series or choice is None:
        return None
    from .io.dicom import resolve_series_choice

    key = str(choice).strip()
    return resolve_series_choice(key, [(s.series_uid, s.modality, "") for s in series], folder) or key


def _info_error(e: BaseException, args: argparse.Namespace) -> Optional[str]:
    """The one-line text of an error ``info`` reports for one path (blanked), or None for an error it does not
    report itself (a bug, or standard output failing: main() says those)."""
    if isinstance(e, MedfuseError):
        return _scrubbed(_cli_error(e).one_line(), args)
    if isinstance(e, OSError) and not getattr(sys.stdout, "failed", False):
        text = _os_error_message(e)
        return _scrubbed(text, args) if text else None
    return None


def _cmd_info(args: argparse.Namespace) -> int:
    _body_option(args)  # a bad --weight-kg or --height-m refused before any path is read, a folder listing too
    paths = list(args.path) if isinstance(args.path, (list, tuple)) else [args.path]
    if len(paths) == 1:
        args.path = paths[0]
        try:
            return _info_one(args)
        except (MedfuseError, OSError) as e:
            text = _info_error(e, args) if args.json else None
            if text is not None:  # --json: standard output is JSON whatever happens (main() says it on stderr)
                print(json.dumps({"path": _scrubbed(os.fspath(paths[0]), args), "error": text}, indent=2))
            raise
    # Several (a shell glob: `medfuse info scans/*`): each in turn, an unreadable one said and skipped.
    if args.series:
        raise InvalidInputError(f"--series picks a series of one folder, and {len(paths)} paths were given",
                                fix="give the one PATH whose series --series picks")
    import io

    _identifiers(args)  # every path's identifiers blank every path's lines (a copy of args below keeps them)
    code, records = EXIT_OK, []
    for i, path in enumerate(paths):
        one = argparse.Namespace(**vars(args))
        one.path = path
        if i and not args.json:
            print()
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer) if args.json else contextlib.nullcontext():
                _info_one(one)
            if args.json:
                records.append(json.loads(buffer.getvalue()))
        except (MedfuseError, OSError) as e:
            text = _info_error(e, args)
            if text is None:
                raise
            code = EXIT_USAGE
            if args.json:  # in the list, and on stderr too: a reader of the terminal or log sees it there
                records.append({"path": _scrubbed(os.fspath(path), args), "error": text})
            sys.stdout.flush()
            print(f"medfuse info: error: {text}", file=sys.stderr)
    if args.json:
        print(json.dumps(records, indent=2))
    return code


def _info_one(args: argparse.Namespace) -> int:
    # A reader's MedfuseWarning (a missing slice, one file of a series) as fuse shows it: one "medfuse: warning:"
    # line, not Python's "file.py:81: MedfuseWarning ... return func(*args)" pair; one that info lists already
    # among the image's warnings is not said twice.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MedfuseWarning)
        shown: List[str] = []
        try:
            return _info(args, shown)
        finally:
            _show_warnings([w for w in caught if not any(t in str(w.message) for t in shown)], args)


def _info(args: argparse.Namespace, shown: List[str]) -> int:
    """``medfuse info``; the image's own warnings it prints are added to ``shown``."""
    from .errors import MultipleSeriesError
    from .io import is_image_file, load_volumes

    p = Path(args.path)
    if not _lexists(p):  # a looping or dangling link: check_readable says which
        from .io._atomic import leftovers

        kept = leftovers(p)
        if kept:  # an overwrite killed mid-swap: the earlier output is aside, maybe its only copy
            raise InvalidInputError(f"no such file or folder, but an interrupted medfuse overwrite left its previous "
                                    f"version in {kept[0].name}", fix="rerun the command that writes it (medfuse "
                                    "puts it back first), or move it back by hand", path=p)
        from .io._atomic import missing_hint

        raise InvalidInputError(f"no such file or folder{missing_hint(p)}", fix="check the path", path=p)
    _check_readable(p)
    if args.series and p.is_file() and is_image_file(p):
        raise InvalidInputError("--series picks a series of a DICOM folder; this file holds one image",
                                fix="leave out --series", path=p)
    series, files = [], []
    if p.is_dir():
        from .errors import UnreadableFileError, UnsupportedDataError
        from .io import scan

        files = _image_files(p)
        try:
            series = scan(p)
        except (UnreadableFileError, UnsupportedDataError) as e:
            if not files:
                if isinstance(e, UnreadableFileError):
                    from .io.dicom import _hidden_note

                    hidden, hidden_fix = _hidden_note(p)  # a series only in a hidden folder: say it was skipped
                    raise UnreadableFileError("the folder holds no DICOM image series and no NIfTI/MetaImage/NRRD "
                                              "file" + hidden,
                                              fix=hidden_fix or "give the file or folder that holds the images",
                                              path=p) from None
                raise
        if args.series and not series:
            raise InvalidInputError("--series picks a DICOM series, and this folder holds none",
                                    fix="leave out --series", path=p)
        if len(series) + len(files) > 1 or (files and not series):
            rows = [{"series_uid": s.series_uid, "modality": s.modality, "series_number": s.series_number or None,
                     "description": s.description, "shape": list(s.shape) if s.shape else None, "n_volumes": s.n_volumes, "n_files": s.n_files,
                     "folder": os.fspath(s.folder), **({"not_volume": s.not_volume} if s.not_volume else {})}
                    for s in series]
            if len(files) == 1 and not series:  # one image file in the folder: describe it
                p = Path(files[0]["file"])
            elif not args.series:
                if args.json:
                    print(json.dumps(_blank_listing({"path": os.fspath(p), "series": rows, "files": files}, args),
                                     indent=2))
                    return EXIT_OK
                what = [f"{len(series)} DICOM series"] if series else []
                what += [f"{len(files)} image file{'s' if len(files) != 1 else ''}"] if files else []
                _print_blanked(args, f"{p}: {' and '.join(what)}")
                for i, r in enumerate(rows, start=1):  # numbered as --series and the several-series error take them
                    shape = "x".join(str(x) for x in r["shape"]) if r["shape"] else "?"
                    folder = os.path.relpath(r["folder"], p) if r["folder"] else "."
                    description = _blank_listing({"description": r["description"]}, args)["description"]
                    # The UID is added after the blanking: it is how the user picks the series (an ID's digits
                    # inside it must not break it).
                    # The DICOM SeriesNumber beside the list number: viewers show it, and the list follows it.
                    number = f"#{r['series_number']}" if r["series_number"] else "#-"
                    # NM projections or planar frames: what they are, not "32x32x0 0 vol".
                    held = f"{r['n_volumes']} vol"
                    if series[i - 1].not_volume:
                        shape, held = "x".join(str(x) for x in r["shape"][:2]), series[i - 1].not_volume
                    _print_blanked(args, f"  {i:>2}: {r['modality']:<4} {number:<5} {shape:<14} {held}  "
                                         f"{r['n_files']:>5} files  {description or '-'}  folder={folder}",
                                   f"  uid={r['series_uid']}")
                for f in files:
                    shape = "x".join(str(x) for x in f["shape"]) if f["shape"] else "?"
                    _print_blanked(args, f"      {'file':<4} {shape:<14} {os.path.relpath(f['file'], p)}")
                hints = [f"medfuse info {_shell_quote(p)} --series N (its number, modality or UID; "
                         f"fuse and register take --series too)"] if series else []
                hints += ["medfuse info FILE"] if files else []
                _print_blanked(args, f"for details: {', or '.join(hints)}")
                return EXIT_OK
    try:
        vols = load_volumes(p, series_uid=args.series, suv=args.suv or "auto", body=_body_option(args))
    except MultipleSeriesError as e:
        raise _cli_error(e) from None
    vol = vols[0]
    if args.volume is not None and len(vols) > 1:
        from .io import _one_of

        try:
            vol = _one_of(vols, args.volume, p)
        except (InvalidInputError, MultipleSeriesError) as e:
            raise _cli_error(e) from None
    import numpy as np

    arr = vol.array
    finite = arr[np.isfinite(arr)] if arr.dtype.kind in "fc" else arr
    if arr.dtype.kind == "c":  # NumPy orders complex numbers by their real part: the range shown was of that
        finite = np.abs(finite)
    facts = {
        "path": os.fspath(p),
        "modality": vol.modality,
        "unit": vol.unit,
        "suv_factor_source": vol.provenance.get("suv_source"),
        "suv_factor": vol.provenance.get("suv_factor"),
        "suv_factor_unit": _suv_factor_unit(vol) or None,
        "shape": list(vol.shape),
        "n_volumes": len(vols),
        **({"volumes": _volume_labels(vols), "volume_shown": _volume_shown(args.volume)} if len(vols) > 1 else {}),
        "spacing_mm": [round(s, 4) for s in vol.spacing],
        "origin_lps_mm": [round(o, 3) for o in vol.origin],
        "orientation": vol.orientation,
        "oblique": vol.is_oblique,
        # Columns: the unit LPS directions of i, j, k (DICOM's ImageOrientationPatient gives the first two).
        "direction_lps": [[round(float(c), 6) for c in row] for row in vol.direction],
        "oblique_deg": round(_oblique_angle(vol.direction)[1], 3),
        "dtype": str(arr.dtype),
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "series_uid": _series_key(series, args.series, p) or vol.provenance.get("series_uid"),
        "series_description": vol.provenance.get("series_description"),
        "image_type": vol.provenance.get("image_type") or None,
        "patient_position": vol.provenance.get("patient_position") or None,
        "n_series_in_folder": len(series) or None,
        "pet_acquisition": _pet_acquisition(vol),
        "warnings": vol.provenance.get("warnings") or [],
    }
    if _body_given(args):
        facts["body"] = _body_given(args)
    shown.extend(str(w) for w in facts["warnings"] if str(w).strip())
    facts = _blank_listing(facts, args)
    if args.json:
        print(json.dumps(facts, indent=2))
        return EXIT_OK
    extent = [s * n for s, n in zip(vol.spacing, vol.shape)]
    print(facts["path"])
    print(f"  modality     {vol.modality}   unit {vol.unit}")
    if facts["suv_factor_source"]:
        factor_unit = (f"; unit {facts['suv_factor_unit']} (stored Bq/mL x factor = {vol.unit} in g/mL)"
                       if facts["suv_factor_unit"] == "g/Bq" else
                       f"; unit {facts['suv_factor_unit']}" if facts["suv_factor_unit"] else
                       "; no unit (a ratio: the series stores SUV)" if facts["suv_factor"] is not None else "")
        # The unit after the source: "SUV factor   0.000409 = body weight / ..." is how consoles start the line.
        print(f"  SUV factor   {_suv_factor_text(facts['suv_factor'])}{_body_words(facts['suv_factor_source'])}"
              f"{factor_unit}")
    tracer = _tracer_text(facts["pet_acquisition"])
    if tracer:
        print(f"  tracer       {tracer}")
    print(f"  shape        {' x '.join(str(s) for s in vol.shape)} voxels ({arr.dtype})")
    if len(vols) > 1:
        # Counted from 0, as every volume_index= fix counts them ("volume 1" was volume_index=0).
        labels = [t for t in facts["volumes"] if t]
        what = "4-D" + (": " + (f"{labels[0]} .. {labels[-1]}" if len(labels) > 2 else ", ".join(labels))
                        if len(labels) == len(vols) else "")
        print(f"  volumes      {len(vols)} ({what}; the geometry and values shown are of {facts['volume_shown']}; "
              "--volume N|sum|mean picks or combines them for info, register, resample, fuse and measure)")
    print(f"  spacing      {' x '.join(f'{s:.4g}' for s in vol.spacing)} mm   "
          f"extent {' x '.join(f'{e:.4g}' for e in extent)} mm")
    from .volume import mm_text

    # Decimals by the voxel size: a mouse's 5 micrometre grid printed "extent 0 x 0 x 0" and "(0.00, -0.00, ...)".
    print(f"  origin       ({', '.join(mm_text(o, vol.spacing, least=2) for o in vol.origin)}) mm LPS   "
          f"orientation {vol.orientation}"
          f"{'  (oblique)' if vol.is_oblique else ''}")
    if vol.is_oblique:  # what a physicist checks against the header's ImageOrientationPatient
        nearest, angle = _oblique_angle(vol.direction)
        cosines = ", ".join(f"{a} ({', '.join(f'{c:.4f}' for c in vol.direction[:, n])})"
                            for n, a in enumerate("ijk"))
        print(f"  direction    {angle:.2f} deg from {nearest}, the nearest axis-aligned orientation")
        print(f"  cosines      {cosines} (LPS)")
    if facts["min"] is not None:
        print(f"  values       {facts['min']:.6g} .. {facts['max']:.6g} {vol.unit}"
              f"{' (magnitude of complex voxels)' if arr.dtype.kind == 'c' else ''}")
    else:
        print("  values       none finite")
    if facts["series_description"]:
        print(f"  series       {facts['series_description']}")
    if facts["image_type"]:
        print(f"  image type   {facts['image_type']}")
    if facts["patient_position"]:
        said = _PATIENT_POSITIONS.get(facts["patient_position"].upper())
        print(f"  position     {facts['patient_position']}{f' ({said})' if said else ''}; the geometry follows the "
              "orientation tags, whatever the position")
    for w in facts["warnings"]:
        print(f"  warning      {_cli_words(str(w))}")
    return EXIT_OK


#: PatientPosition (0018,5100) in words.
_PATIENT_POSITIONS = {"HFS": "head first, supine", "HFP": "head first, prone", "FFS": "feet first, supine",
                      "FFP": "feet first, prone", "HFDR": "head first, decubitus right",
                      "HFDL": "head first, decubitus left", "FFDR": "feet first, decubitus right",
                      "FFDL": "feet first, decubitus left"}


#: Element names as DICOM's radionuclide code meanings spell them ("^18^Fluorine"), by symbol.
_ELEMENTS = {"carbon": "C", "nitrogen": "N", "oxygen": "O", "fluorine": "F", "copper": "Cu", "gallium": "Ga",
             "rubidium": "Rb", "zirconium": "Zr", "yttrium": "Y", "technetium": "Tc", "indium": "In",
             "iodine": "I", "thallium": "Tl", "lutetium": "Lu", "scandium": "Sc", "bromine": "Br",
             "xenon": "Xe", "krypton": "Kr", "cobalt": "Co", "chromium": "Cr", "samarium": "Sm",
             "radium": "Ra", "actinium": "Ac", "terbium": "Tb", "lead": "Pb", "bismuth": "Bi"}


def _volume_labels(vols: Sequence[Any]) -> List[Optional[str]]:
    """What each volume of a 4-D input is (its provenance's ``volume`` label: gate, frame, energy window)."""
    return [(v.provenance.get("volume") or {}).get("label") or None for v in vols]


def _volume_shown(choice: Any) -> str:
    """Which volume ``info`` shows for a ``--volume`` choice, in words."""
    if choice in ("sum", "mean"):
        return f"their {choice}"
    return f"volume {choice if choice is not None else 0}" + (" (the first)" if choice is None else "")


def _pet_acquisition(vol: Any) -> Optional[Dict[str, Any]]:
    """A PET/SPECT volume's acquisition facts (``provenance["pet_acquisition"]``), None for others or unknown."""
    facts = vol.provenance.get("pet_acquisition") if vol.modality in ("PT", "NM") else None
    return dict(facts) if isinstance(facts, Mapping) and any(v is not None for v in facts.values()) else None


def _nuclide_text(name: Any) -> str:
    """A radionuclide as it is read (``"^18^Fluorine"``: ``18F``, ``"^99m^Technetium"``: ``99mTc``); a name of
    another form as it is, its carets dropped."""
    text = str(name).strip()
    m = (re.fullmatch(r"\^?(\d+m?)\^?\s*-?\s*([A-Za-z]+)", text)
         or re.fullmatch(r"([A-Za-z]+)\s*-?\s*\^?(\d+m?)\^?", text))
    if m:
        mass, element = m.groups() if m.group(1)[0].isdigit() else m.groups()[::-1]
        symbol = _ELEMENTS.get(element.lower(), element if len(element) <= 2 else None)
        if symbol:
            return f"{mass}{symbol}"
    return text.replace("^", "")


def _tracer_text(facts: Optional[Mapping[str, Any]]) -> str:
    """``info``'s tracer line: ``FDG (18F, half-life 109.8 min), 370.0 MBq injected, uptake 62 min,
    decay-corrected to START, attenuation-corrected``; what is unknown is left out ("" when nothing is known).
    No dates: the injection and scan times are the patient's."""
    if not facts:
        return ""
    inner = [_nuclide_text(facts["radionuclide"])] if facts.get("radionuclide") else []
    half = facts.get("half_life_s")
    if isinstance(half, (int, float)) and half > 0:
        inner.append(f"half-life {half / 60:.1f} min" if half < 3 * 3600 else f"half-life {half / 3600:.3g} h")
    tracer = str(facts["tracer"]).strip() if facts.get("tracer") else ""
    head = f"{tracer} ({', '.join(inner)})" if tracer and inner else tracer or ", ".join(inner)
    parts = [head] if head else []
    if isinstance(facts.get("injected_mbq"), (int, float)):
        parts.append(f"{facts['injected_mbq']:.1f} MBq injected")
    if isinstance(facts.get("uptake_min"), (int, float)):
        # Rb-82, O-15 and N-13 scans start a minute or two after the injection: "2 min" for 90 s was a third off.
        up = facts["uptake_min"]
        parts.append(f"uptake {up:.1f} min ({up * 60:.0f} s)" if up < 10 else f"uptake {up:.0f} min")
    corrected = str(facts.get("decay_correction") or "").strip().upper()
    if corrected:
        parts.append("not decay-corrected" if corrected == "NONE" else f"decay-corrected to {corrected}")
    method = f" ({str(facts['attenuation_method']).strip()})" if facts.get("attenuation_method") else ""
    if facts.get("attenuation_corrected") is True:
        parts.append(f"attenuation-corrected{method}")
    elif facts.get("attenuation_corrected") is False:
        parts.append("NOT attenuation-corrected (its values are not quantitative)")
    return ", ".join(parts)


def _oblique_angle(direction: Any) -> Tuple[str, float]:
    """The axis-aligned orientation nearest a grid's direction matrix (its code, e.g. ``"LPS"``) and the angle
    in degrees of the rotation between the two (0 for an axis-aligned grid).

    The nearest is the signed permutation of the world axes, of the same handedness, closest to the matrix (the
    largest trace of ``P.T @ D``): ``D = P @ R`` with ``R`` a rotation by ``arccos((trace(R) - 1) / 2)``.
    """
    import itertools

    import numpy as np

    d = np.asarray(direction, dtype=float)
    letters = (("L", "R"), ("P", "A"), ("S", "I"))
    best, code = -np.inf, ""
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            p = np.zeros((3, 3))
            p[list(perm), range(3)] = signs  # voxel axis n points along world axis perm[n]
            if np.linalg.det(p) * np.linalg.det(d) < 0:
                continue
            trace = float(np.trace(p.T @ d))
            if trace > best:
                best = trace
                code = "".join(letters[w][0 if sg > 0 else 1] for w, sg in zip(perm, signs))
    return code, float(np.degrees(np.arccos(np.clip((best - 1.0) / 2.0, -1.0, 1.0))))


def _suv_factor_unit(vol: Any) -> str:
    """The unit of a PET's SUV factor (``provenance["suv_factor"]``), from the stored unit its source names:
    ``g/Bq`` (Bq/mL stored; SUVbw and SUVlbm in g/mL), ``cm²/Bq`` (SUVbsa), ``.../mL per count`` (counts
    stored), ``""`` for a ratio (a series that stores SUV already); ``""`` where there is no factor."""
    source = str(vol.provenance.get("suv_source") or "")
    if vol.provenance.get("suv_factor") is None or not source:
        return ""
    stored = re.search(r"\bUnits (\w+)", source)
    stored = stored.group(1).upper() if stored else "BQML"
    if stored in ("GML", "CM2ML"):
        return ""
    per = "cm²" if vol.unit == "SUVbsa" else "g"
    return f"{per}/mL per count" if stored == "CNTS" else f"{per}/Bq"


def _suv_factor_text(factor: Any) -> str:
    """The SUV multiplier as a console shows it (``"0.0003171 = "``), or a range where the slices' factors
    differ; empty when unknown."""
    if isinstance(factor, (int, float)):
        return f"{factor:.7g} = "
    if isinstance(factor, (list, tuple)) and len(factor) == 2:
        return f"{factor[0]:.7g} .. {factor[1]:.7g} (by slice) = "
    return ""


def _blank_listing(record: Any, args: argparse.Namespace) -> Any:
    """An info listing (a dict, recursively) with the inputs' patient identifiers blanked as in every other
    message: paths and folders of an export named after the patient (``DOE^JANE_PID12345_pet``) show as
    ``[removed]_[removed]_pet``. A series description that names the patient is dropped whole (free text: what
    else it says about them cannot be told; napari's reader drops it the same way), one that does not is kept.
    Series UIDs are kept as they are: the listing shows them so that the user can pick a series with --series.
    """
    ids = _identifiers(args)
    if not ids:
        return record
    from .provenance import _REDACTED, scrub

    def blank(key: Optional[str], value: Any) -> Any:
        if isinstance(value, dict):
            return {k: blank(k, v) for k, v in value.items()}
        if isinstance(value, list):
            return [blank(key, v) for v in value]
        if not isinstance(value, str) or key == "series_uid":
            return value
        clean = scrub(value, ids)
        return _REDACTED if key in ("description", "series_description") and clean != value else clean

    return blank(None, record)


def _print_blanked(args: argparse.Namespace, text: str, tail: str = "") -> None:
    """Print ``text`` with the inputs' patient identifiers blanked, then ``tail`` as it is (a series UID)."""
    print(_scrubbed(text, args) + tail)


# ----------------------------------------------------------------------------- register
def _fmt_metric(value: Optional[float]) -> str:
    # None when too few samples overlapped to evaluate it (e.g. the images barely overlap as the scanners placed them).
    return "n/a" if value is None else f"{value:.4f}"


def _cmd_register(args: argparse.Namespace) -> int:
    from . import provenance as prov
    from .io._atomic import check_output
    from .io.writers import check_save_target
    from .registration.transforms import TRANSFORM_SUFFIXES

    out = Path(args.output)
    tfm = Path(args.transform) if args.transform else prov.sidecar_path(out).with_suffix(".tfm")
    args.outputs = _Outputs(out, tfm, prov.sidecar_path(out))
    _check_readable(args.fixed, args.moving, args.initial_transform)
    # Everything that can be refused is refused here, before minutes of work and before any file is written.
    check_save_target(out, overwrite=args.overwrite, inputs=[args.fixed, args.moving, args.initial_transform])
    if getattr(args, "keep_identity", False):
        from .pipeline import check_identity_kept

        check_identity_kept(out, args.fixed, option="--keep-identity")
    if not tfm.name.lower().endswith(TRANSFORM_SUFFIXES):
        raise InvalidInputError(f"unknown transform file ending {tfm.suffix!r}",
                                fix="use .tfm, .txt, .h5 or .mat (.mat: rigid and affine only)", path=tfm)
    from .registration.transforms import refuse_upper_case_ending

    refuse_upper_case_ending(tfm)
    if tfm.name.lower().endswith(".mat") and args.kind == "deformable":
        raise InvalidInputError("a deformable transform cannot be stored in a .mat file (it holds one matrix)",
                                fix="use .h5 or .tfm", path=tfm)
    if tfm.resolve() in (out.resolve(), prov.sidecar_path(out).resolve()):
        raise InvalidInputError("the transform would be written onto the output image or its sidecar",
                                fix="give --transform another path", path=tfm)
    init_path = args.initial_transform
    if init_path and os.path.realpath(tfm) == os.path.realpath(init_path):
        # check_output below called it "the volume's own source file", which it is not.
        raise InvalidInputError("the transform would be written onto the --initial-transform file, an input",
                                fix="give --transform another path (the initial transform is never written over)",
                                path=tfm)
    # The initial transform is an input too: never written over (the image output was checked above).
    check_output(tfm, overwrite=args.overwrite, inputs=[args.fixed, args.moving, init_path], kind="file")
    prov.check_sidecar(out, overwrite=args.overwrite)
    from .io.writers import _probe_writable

    # The transform may go to another folder than the image: an unwritable one is refused now, not after the
    # image is written (which then stood alone, under an error saying nothing was written).
    _probe_writable(tfm)
    from .registration.register import _as_initial

    # Read and checked (missing, unreadable, deformable) before the images are loaded.
    initial = _as_initial(init_path) if init_path else None
    _check_modalities_option(args, 2)
    _check_series_option(args, 2)
    body = _body_option(args)
    picks = args.series or [None, None]
    from .pipeline import _itk_threads, _load_with_body, _warn_body_unused
    from .registration import register

    # The readers' and the registration's MedfuseWarnings as every command shows them ("medfuse: warning: ..."),
    # not as Python's "/path/bin/medfuse:6: MedfuseWarning ... sys.exit(main())" pair; also when it then fails.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MedfuseWarning)
        try:
            fixed, moving = (_load_with_body(p, body, series_uid=None if pick in (None, "-") else pick, modality=m,
                                             suv=args.suv or "auto")
                             for p, pick, m in zip((args.fixed, args.moving), picks, args.modalities or [None, None]))
            _warn_body_unused([fixed, moving], body)
            if getattr(args, "keep_identity", False):  # refused before the registration, not after it
                from .pipeline import _refuse_other_patients

                _refuse_other_patients([fixed, moving], warn_unknown=True)
            t0 = time.perf_counter()
            with _CancelOnSigint() as token, _Bar(f"register ({args.kind})", enabled=_bar_enabled(args)) as bar, \
                    _itk_threads(args.threads):
                res = register(fixed, moving, kind=args.kind, metric=args.metric, progress=bar, cancel=token,
                               initialise=args.initialise, initial_transform=initial, fill=args.fill)
        finally:
            _show_warnings(caught, args)
    seconds = time.perf_counter() - t0
    try:
        side = _write_registration(args, res, out, tfm, seconds, loaded=(fixed, moving))
    except Exception as e:
        # Image, transform and sidecar are one result: a write that still fails (disk full, a folder gone) takes
        # back the ones this run wrote, so that the error's "nothing was written" is true and a re-run can start.
        removed = _remove_written(args.outputs)
        if removed and isinstance(e, MedfuseError):
            names = ", ".join(p.name for p in removed)
            e.problem = f"{e.problem} (the outputs this run had written are removed: {names})"
            e.args = (e._compose(),)
        raise
    rep = res.report.to_dict()
    note = _initial_note(rep) if args.initial_transform else ""
    _say(args, f"registered ({args.kind}): {_registration_text(rep, note)}, {seconds:.1f} s")
    _say_notes(args, rep, "FIXED and MOVING")
    notes = _timepoint_notes(args, fixed, moving)
    if rep.get("suspect"):
        print(f"medfuse: warning: the registration looks suspect: "
              f"{_cli_advice('; '.join(rep['suspect_reasons']), 'register')}", file=sys.stderr)
    if rep.get("bspline_kept") is False:  # the transform written is the affine part: say so where it is read
        print(f"medfuse: note: {str(rep.get('stop_reason', '')).split('; ')[0]}", file=sys.stderr)
    if rep.get("fov_scale") is not None:  # a small image: the preset's millimetre settings were shrunk to fit it
        print(f"medfuse: note: small field of view: the preset's millimetre settings were scaled by "
              f"{rep['fov_scale']:.2g}", file=sys.stderr)
    _say(args, f"wrote {out} (moving image on the fixed grid)\nwrote {tfm} (ITK transform, fixed -> moving points)"
               f"\nwrote {side} (provenance)")
    if args.json:  # the report as the sidecar records it (its notes included)
        _print_json(args, {"command": "register", "outputs": {"image": os.fspath(out), "transform": os.fspath(tfm),
                                                              "sidecar": os.fspath(side)},
                           "registration": rep, "seconds": round(seconds, 3), "notes": notes,
                           "warnings": _warning_texts(caught, args)})
    return EXIT_OK


def _transform_chain(paths: Sequence[Any], *, inverse: bool = False):
    """The transform files of ``--transform T [T ...]`` as one Transform (None for none): the first maps the
    reference image's points on, the last lands in the moving image (``compose`` applies its argument first).

    ``inverse`` (``resample --inverse``): the inverse of that chain, ``T1^-1(...(Tn^-1(p)))``, for files written
    the other way round (MOVING's points to REFERENCE's, e.g. the transform that put REFERENCE on MOVING's grid).

    Raises:
        InvalidInputError: with ``inverse``, no files, or a deformable transform, which has no closed-form inverse.
    """
    from .errors import RegistrationError
    from .registration.transforms import load_transform

    if inverse and not paths:
        raise InvalidInputError("--inverse inverts the --transform files, and none was given",
                                fix="add --transform T.tfm, or leave out --inverse")
    chain = None
    for path in (reversed(paths) if inverse else paths):
        t = load_transform(path)
        if inverse:
            try:
                t = t.inverse()
            except RegistrationError:  # its fix spoke of SimpleITK calls, not of the command's options
                raise InvalidInputError("--inverse: this transform is deformable (a B-spline or displacement "
                                        "field) and has no closed-form inverse", fix="register the other way "
                                        "round (medfuse register with FIXED and MOVING swapped) and pass that "
                                        "transform without --inverse", path=path) from None
        chain = t if chain is None else t.compose(chain)
    return chain


def _cmd_resample(args: argparse.Namespace) -> int:
    """``medfuse resample``: MOVING on REFERENCE's grid through saved transforms (a chain: each applied in turn)."""
    from . import provenance as prov
    from .io import dicom_template, is_image_file, save
    from .io.writers import check_save_target
    from .registration import resample

    out = Path(args.output)
    chain_paths = list(args.transform or [])
    args.outputs = _Outputs(out, prov.sidecar_path(out))
    _check_readable(args.reference, args.moving, *chain_paths)
    check_save_target(out, overwrite=args.overwrite, inputs=[args.reference, args.moving, *chain_paths])
    prov.check_sidecar(out, overwrite=args.overwrite)
    if getattr(args, "keep_identity", False):
        from .pipeline import check_identity_kept

        check_identity_kept(out, args.reference, option="--keep-identity")
    _check_modalities_option(args, 2)
    _check_series_option(args, 2)
    # Read (and refused) before the images are loaded.
    chain = _transform_chain(chain_paths, inverse=args.inverse)
    _check_transform_direction(args, args.reference, side="REFERENCE", onto="MOVING's")
    grid_options = _grid_options(args)
    body = _body_option(args)
    picks = args.series or [None, None]
    from .pipeline import _load_with_body, _warn_body_unused

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MedfuseWarning)
        try:
            reference, moving = (_load_with_body(p, body, series_uid=None if pick in (None, "-") else pick,
                                                 modality=m, suv=args.suv or "auto")
                                 for p, pick, m in zip((args.reference, args.moving), picks,
                                                       args.modalities or [None, None]))
            _warn_body_unused([reference, moving], body)
            if getattr(args, "keep_identity", False):
                from .pipeline import _refuse_other_patients

                _refuse_other_patients([reference, moving], warn_unknown=True)
            grid = reference
            if grid_options:
                from .registration import common_grid

                grid = common_grid([reference], **grid_options)
            moved = resample(moving, grid, transform=chain, interpolation=args.interpolation, default=args.fill)
        finally:
            _show_warnings(caught, args)
    try:
        save(moved, out, overwrite=args.overwrite,
             template=None if is_image_file(out) else dicom_template(args.reference),
             deidentify=not getattr(args, "keep_identity", False))
        args.outputs.mark(out)
        inputs = [{"role": "reference", "path": args.reference, "sha256": prov.hash_path(args.reference)},
                  {"role": "moving", "path": args.moving, "sha256": prov.hash_path(args.moving)}]
        from .pipeline import _volume_facts

        for rec, vol in zip(inputs, (reference, moving)):
            rec.update(_volume_facts(vol))
        done = [h for h in moved.provenance.get("history", []) if h.get("step") == "resample"]
        params = {"transforms": [os.fspath(p) for p in chain_paths], "interpolation": args.interpolation,
                  "fill": args.fill}
        if args.inverse:  # the files' transforms were inverted: the same files, the other direction
            params["inverse"] = True
        params.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in grid_options.items()})
        if args.suv:  # asked: a PET that fell back to Bq/mL shows it beside the inputs' facts
            params["suv"] = args.suv
        if _body_given(args):
            params["body"] = _body_given(args)
        if args.modalities:
            params["modalities"] = list(args.modalities)
        if args.series:
            from .io import series_choice_record

            params["series"] = [series_choice_record(s) for s in args.series]
        extra: Dict[str, Any] = {"transforms": [{"path": os.fspath(p), "sha256": prov.hash_path(p)}
                                                for p in chain_paths]}
        if done:  # what the resampling did (interpolation and fill chosen, the transform's matrix)
            extra["resample"] = {k: done[-1][k] for k in ("interpolation", "fill", "transform_matrix")
                                 if k in done[-1]}
        said = _warning_texts(caught, args)
        if said:  # as fuse's sidecar keeps them (two frames of reference, a PET maximum lowered): not only shown
            extra["warnings"] = said
        seconds = round(time.perf_counter() - t0, 3)
        record = prov.build(inputs=inputs, output=out, output_sha256=prov.hash_path(out),
                            steps=[{"name": "resample", "params": params, "seconds": seconds}],
                            parameters=params, extra=extra)
        side = prov.write_sidecar(out, record, input_paths=[args.reference, args.moving, *chain_paths])
        args.outputs.mark(side)
    except BaseException as e:
        removed = _remove_written(args.outputs)  # an image without its sidecar is not left as if complete
        if removed and isinstance(e, MedfuseError):
            e.problem = f"{e.problem} (the outputs this run had written are removed: " \
                        f"{', '.join(p.name for p in removed)})"
            e.args = (e._compose(),)
        raise
    how = done[-1].get("interpolation", args.interpolation or "linear") if done else "as it was"
    through = (f"through {'the inverse of ' if args.inverse else ''}{len(chain_paths)} "
               f"transform{'s' if len(chain_paths) > 1 else ''}" if chain_paths
               else "as the scanners placed the two images")
    onto = "the reference grid" if not grid_options else (
        f"the reference's field of view on a {_coords(moved.spacing, 'mm')} {moved.orientation} grid "
        f"({' x '.join(str(n) for n in moved.shape)} voxels)")
    _say(args, f"resampled onto {onto} {through} ({how})")
    notes = _timepoint_notes(args, reference, moving)
    _say(args, f"wrote {out}\nwrote {side} (provenance)")
    if args.json:
        _print_json(args, {"command": "resample", "outputs": {"image": os.fspath(out), "sidecar": os.fspath(side)},
                           "transforms": [os.fspath(p) for p in chain_paths], "inverse": args.inverse,
                           "interpolation": how, "seconds": seconds, "notes": notes,
                           "warnings": _warning_texts(caught, args)})
    return EXIT_OK


def _grid_options(args: argparse.Namespace) -> Dict[str, Any]:
    """``resample --spacing/--orientation`` as :func:`medfuse.registration.common_grid` takes them ({} when neither
    was given), checked before any image is loaded."""
    from .registration.resample import _grid_spacing, _orientation_direction

    options: Dict[str, Any] = {}
    if args.spacing is not None:
        spacing = args.spacing[0] if len(args.spacing) == 1 else tuple(args.spacing)
        try:
            _grid_spacing(spacing)
        except InvalidInputError as e:
            raise InvalidInputError(f"--spacing: {e.problem}",
                                    fix="give one voxel size in mm (isotropic, e.g. --spacing 1) or three "
                                        "(e.g. --spacing 1 1 2)") from None
        options["spacing"] = spacing
    if args.orientation is not None:
        try:
            _orientation_direction(args.orientation)
        except InvalidInputError as e:
            raise InvalidInputError(f"--orientation: {e.problem}", fix=e.fix) from None
        options["orientation"] = args.orientation.strip().upper()
    return options


def _remove_written(outputs: "_Outputs") -> List[Path]:
    """Delete the outputs this run wrote and marked (:meth:`_Outputs.own`); returns those removed."""
    removed = []
    for p in outputs.own():
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _write_registration(args: argparse.Namespace, res: Any, out: Path, tfm: Path, seconds: float, *,
                        loaded: Sequence[Any] = ()) -> Path:
    """Write the resampled image, the transform and the provenance sidecar; returns the sidecar's path.

    ``loaded``: the fixed and moving Volumes as loaded, whose modality, unit and grid the sidecar records (as
    fuse's does; it recorded path and hash only).
    """
    from . import provenance as prov
    from .pipeline import _volume_facts
    from .io import save

    init_path = args.initial_transform
    from .io import dicom_template, is_image_file

    # A DICOM output is on FIXED's grid: a DICOM FIXED is its template (study, frame of reference, position).
    save(res.resampled, out, overwrite=args.overwrite,
         template=None if is_image_file(out) else dicom_template(args.fixed),
         deidentify=not getattr(args, "keep_identity", False))
    args.outputs.mark(out)
    # Its inputs too: the transform's permissions are no wider than theirs, as the image's and sidecar's.
    res.transform.save(tfm, overwrite=args.overwrite, inputs=[args.fixed, args.moving, init_path])
    args.outputs.mark(tfm)
    rep = res.report.to_dict()
    inputs = [{"role": "fixed", "path": args.fixed, "sha256": prov.hash_path(args.fixed)},
              {"role": "moving", "path": args.moving, "sha256": prov.hash_path(args.moving)}]
    for rec, vol in zip(inputs, loaded):
        rec.update(_volume_facts(vol))
    # None: SimpleITK's default (re-runs may differ, see --threads)
    params = {"kind": args.kind, "metric": args.metric, "initialise": args.initialise, "threads": args.threads}
    if args.modalities:  # they pick the preset, and so change the result (fuse records them under load)
        params["modalities"] = list(args.modalities)
    if getattr(args, "suv", None):
        params["suv"] = args.suv
    if _body_given(args):
        params["body"] = _body_given(args)
    if args.series:
        from .io import series_choice_record

        params["series"] = [series_choice_record(s) for s in args.series]
    if getattr(args, "keep_identity", False):  # as fuse's save step records it: only when kept
        params["deidentify"] = False
    extra = {"transform": {"path": os.fspath(tfm), "sha256": prov.hash_path(tfm)}}
    # How the moving image was put on the fixed grid (a fuse sidecar says it; this one did not): the interpolation
    # and the fill value set the resampled voxels, and change a PET's SUVs (docs/registration.md).
    done = [h for h in res.resampled.provenance.get("history", []) if h.get("step") == "resample"]
    if done:
        extra["resample"] = {k: done[-1][k] for k in ("interpolation", "fill") if k in done[-1]}
    if init_path:
        params["initial_transform"] = os.fspath(init_path)
        extra["initial_transform"] = {"path": os.fspath(init_path), "sha256": prov.hash_path(init_path)}
    record = prov.build(inputs=inputs, output=out, output_sha256=prov.hash_path(out),
                        steps=[{"name": "register", "params": params, "seconds": round(seconds, 3)}],
                        parameters=params, registration=[rep], extra=extra)
    side = prov.write_sidecar(out, record, input_paths=[args.fixed, args.moving])
    args.outputs.mark(side)
    return side


def _registration_text(rep: Mapping[str, Any], note: str = "") -> str:
    """What a registration did, as register and fuse say it: ``metric -0.3963 -> -0.6810 (lower is better),
    rotation 9.50 deg, translation 14.00 mm`` (fuse gave the metric alone, without which way is better)."""
    return (f"metric {_fmt_metric(rep.get('metric_before'))} -> {_fmt_metric(rep.get('metric_after'))} (lower is "
            f"better{note}), rotation {rep.get('rotation_deg') or 0:.2f} deg, "
            f"translation {rep.get('translation_mm') or 0:.2f} mm")


def _say_notes(args: argparse.Namespace, rep: Mapping[str, Any], which: str) -> None:
    """The registration report's notes, one line each (a body box registered within, one frame of reference kept).

    Images in one DICOM frame of reference (a hybrid PET/MR or PET/CT) were placed by the scanner: the note says so,
    and how to fuse them without registering, which could only correct patient motion between the series.
    """
    how = ("fusing with 'medfuse fuse --register none' (or 'medfuse resample' without --transform)"
           if args.command == "register" else "--register none")
    advice = f"; {how} suffices unless the patient moved between the series"
    frame = "one frame of reference: "
    notes = list(rep.get("notes") or [])
    if rep.get("same_frame_of_reference") is True and not any(n.startswith(frame) for n in notes):
        notes.append(frame + "already aligned by the scanner")  # a report from before the notes field
    for n in notes:
        if n.startswith(frame):
            n = f"{which} share one frame of reference: {n[len(frame):]}{advice}"
        _say(args, f"  note: {n}")


def _timepoint_notes(args: argparse.Namespace, baseline: Any, followup: Any) -> List[str]:
    """Why two PETs' SUVs are not comparable (:func:`medfuse.timepoints.comparability`, the first input taken as
    the baseline), each said as a ``note:`` line; returned for ``--json``'s ``notes``."""
    from .timepoints import comparability

    notes = comparability(baseline, followup)
    _say_notes(args, {"notes": notes}, "")
    return notes


def _initial_note(rep: dict) -> str:
    """The metric at --initial-transform and whether a start derived from it won (the report's initialisation)."""
    won = str(rep.get("initialisation", "")).startswith("initial")
    return (f"; {_fmt_metric(rep.get('metric_initial'))} at the initial transform, "
            f"{'started from it' if won else 'not used: a start without it scored better'}")


def _add_keep_identity_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-identity", action="store_true",
                   help="DICOM output from a DICOM FIXED only: keep FIXED's patient and study (name, ID, study and "
                        "frame-of-reference UIDs), so that a PACS files the result into the patient's own study "
                        "(default: de-identified, with pseudonymous UIDs); the sidecar and messages never hold them")


def _add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_bounded_count(MAX_THREADS), default=None, metavar="N",
                   help="ITK threads for registration (1 for bit-identical re-runs; with more, re-runs differ in "
                        "the last digits, and by millimetres when the optimiser stops unconverged)")


def _bar_enabled(args: argparse.Namespace) -> Optional[bool]:
    """False under -q or --no-progress; None otherwise (the environment and the terminal decide, see :class:`_Bar`)."""
    return False if getattr(args, "quiet", False) or getattr(args, "no_progress", False) else None


# ----------------------------------------------------------------------------- fuse
def _add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", metavar="{cpu,cuda,cuda:N,auto}",
                   help="where the network runs (default: cpu; auto: a CUDA GPU when there is one); the classical "
                        "rules run on the CPU, and a GPU this machine lacks is refused for every method")


def _check_device(args: argparse.Namespace) -> None:
    """A GPU this machine lacks is a usage error, found before anything is written or any subject starts.

    (``fuse`` needs no call: its pipeline's FuseStep checks the device when it is built, before loading.)"""
    from .fusion.device import check_network_device

    check_network_device(args.method, args.device)


def _check_device_name(device: str) -> None:
    """A misspelt --device is a usage error with every method (the classical rules, which run on the CPU,
    ignored it: ``--device gpu --method mean`` ran, ``--device gpu`` failed)."""
    from .fusion.device import check_device_name

    check_device_name(device)


def _add_modalities_option(p: argparse.ArgumentParser, why: str) -> None:
    p.add_argument("--modalities", nargs="+", metavar="M", default=None,
                   help="the modality of each input, FIXED first: MR, CT, PT or NM (PET, SPECT accepted); " + why +
                        ". Default: from DICOM headers, medfuse's own files or a dcm2niix (BIDS) .json beside a "
                        "NIfTI, else unknown. A CT NIfTI with values below -100 is taken as HU")


def _add_series_option(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--series", nargs="+", metavar="S", default=None,
                   help="for DICOM folders holding several series side by side (a PACS export of a PET/CT): one "
                        "choice per input, FIXED first: the series' number as listed, its modality (CT, MR, PT, "
                        f"NM) or its UID; '-' for an input that needs none. e.g. {example}")


def _volume_choice(text: str) -> Any:
    """An argparse type: ``--volume``'s volume index (a whole number) or ``sum``/``mean``."""
    if text in ("sum", "mean"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a volume index (0, 1, ..., -1 for the last), sum or mean, got "
                                         f"{label(text)}") from None


def _add_volume_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--volume", type=_volume_choice, default=None, metavar="N|sum|mean",
                   help="for every 4-D input (a gated or dynamic series, a 4-D NIfTI): the volume to use, counted "
                        "from 0 ('medfuse info' lists what each is: gate, frame, energy window), or all of them as "
                        "one: sum (a gated SPECT's counts: the ungated image) or mean (a gated PET, a dynamic PET's "
                        "frames, weighted by their durations). Refused for volumes that are no repeats of one "
                        "image (two isotopes' energy windows, Dixon images). 3-D inputs ignore it")


def _add_image_output_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output image (.nii.gz, .mha, .nrrd; a name without suffix writes a DICOM series folder)")


def _add_suv_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--suv", choices=("auto", "bw", "lbm", "lbm_janma", "bsa", "none"), default=None,
                   help="how a DICOM PET's values are read: auto = SUVbw, or the SUV kind a series stores; bw = body "
                        "weight; lbm = lean body mass, James (SUL, as PERCIST uses it); lbm_janma = lean body mass, "
                        "Janmahasatian; bsa = body surface area (lbm, lbm_janma and bsa need the patient's height "
                        "and sex: without them, SUVbw, with a warning); none = no SUV: Bq/mL (Philips raw counts "
                        "converted with their activity concentration factor; counts where it is missing). Other "
                        f"inputs ignore it. Default: {default}")


def _add_body_options(p: argparse.ArgumentParser) -> None:
    """``--weight-kg``, ``--height-m``, ``--sex``: a DICOM PET's body in place of its header's (load's ``body=``).
    Not for batch: one body for a whole cohort would be wrong (batch reads each subject's from its headers)."""
    from .io.suv import HEIGHT_RANGE_M, WEIGHT_RANGE_KG

    other = "Other inputs ignore it; not recorded, only that it was given"
    p.add_argument("--weight-kg", type=float, default=None, metavar="KG",
                   help=f"DICOM PET only: the patient's weight in kg (e.g. 3.2; 0.6 for 600 g), replacing the "
                        f"header's PatientWeight for SUV (a header without it, a weight entered wrongly, a child); "
                        f"checked as the header's is: {WEIGHT_RANGE_KG[0]:g} to {WEIGHT_RANGE_KG[1]:g} kg. {other}")
    p.add_argument("--height-m", type=float, default=None, metavar="M",
                   help=f"DICOM PET only: the patient's height in metres (e.g. 0.52 for 52 cm), replacing the "
                        f"header's PatientSize for SUV (--suv lbm, lbm_janma and bsa use it); checked as the "
                        f"header's is: {HEIGHT_RANGE_M[0]:g} to {HEIGHT_RANGE_M[1]:g} m. {other}")
    p.add_argument("--sex", type=str.upper, choices=("M", "F"), default=None,
                   help=f"DICOM PET only: the patient's sex, replacing the header's PatientSex for SUV (--suv lbm "
                        f"and lbm_janma use it). {other}")


def _body_option(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """The body ``--weight-kg``, ``--height-m`` and ``--sex`` give, as load's ``body=`` (only those given); None
    when none is.

    Raises:
        InvalidInputError: a weight or height that is not a finite number within the plausible range, named by
            its option (load's check names the dict key).
    """
    from .io.suv import check_body

    body = {k: getattr(args, k) for k in ("weight_kg", "height_m", "sex") if getattr(args, k, None) is not None}
    if not body:
        return None
    try:
        check_body(body)
    except InvalidInputError as e:
        problem = re.sub(r"body\['(\w+)'\]", lambda m: "--" + m.group(1).replace("_", "-"), e.problem)
        raise InvalidInputError(problem, fix="give --weight-kg in kilograms and --height-m in metres (e.g. "
                                             "--weight-kg 3.2 --height-m 0.52), or leave them out to use the PET "
                                             "header's") from None
    return body


def _body_given(args: argparse.Namespace) -> List[str]:
    """Which of the body options were given, as the records keep them (``["weight_kg"]``): never their values,
    which are the patient's (as fuse's sidecar drops the injected dose)."""
    return [k for k in ("weight_kg", "height_m", "sex") if getattr(args, k, None) is not None]


def _check_series_option(args: argparse.Namespace, n_inputs: int) -> None:
    if args.series is not None and len(args.series) != n_inputs:
        raise InvalidInputError(f"--series gives {len(args.series)} choices for {n_inputs} inputs",
                                fix="give one per input, FIXED first, '-' for an input that needs none, "
                                    "e.g. --series CT PT")


def _check_modalities_option(args: argparse.Namespace, n_inputs: int) -> None:
    """``--modalities``: one known modality per input, FIXED first (refused before anything is read)."""
    if args.modalities is None:
        return
    if len(args.modalities) != n_inputs:
        raise InvalidInputError(f"--modalities names {len(args.modalities)} modalities for {n_inputs} inputs",
                                fix="give one per input, FIXED first, e.g. --modalities MR PT")
    _check_modality_names(args.modalities)


def _check_modality_names(names: Sequence[str], *, unstated_ok: bool = False) -> None:
    """Each ``--modalities`` entry a modality medfuse knows (``-`` too where ``unstated_ok``: not stated)."""
    from .volume import normalise_modality

    for i, m in enumerate(names, start=1):
        if unstated_ok and m == "-":
            continue
        try:
            normalise_modality(m)
        except InvalidInputError as e:  # the reader's message repeats the value: a pasted path is not shown
            raise InvalidInputError(f"--modalities: unknown modality {label(m)} for input {i}", fix=e.fix) from None


def _measure_choices(args: argparse.Namespace, option: str, n_inputs: int, example: str) -> List[Optional[str]]:
    """``measure --modalities`` or ``--series``: IMAGE's, then optionally MASK's (a mask needs neither); ``-`` for
    one not stated. One entry per input, None where not stated.

    Why not fuse's check: ``measure PET --modalities PT --mask m.nii.gz`` was refused with "names 1 modalities for
    2 inputs ... FIXED first, e.g. --modalities MR PT" (fuse's words), and ``-`` for the mask as an unknown
    modality.

    Raises:
        InvalidInputError: none, or more entries than inputs; an unknown modality.
    """
    given = getattr(args, option[2:])
    if given is None:
        return [None] * n_inputs
    if not 1 <= len(given) <= n_inputs:
        inputs = "IMAGE and MASK" if n_inputs == 2 else "IMAGE (no --mask was given)"
        plural = "modalities" if option == "--modalities" else "choices"
        raise InvalidInputError(f"{option} names {len(given)} {plural} for {n_inputs} input"
                                f"{'s' if n_inputs > 1 else ''}: {inputs}",
                                fix=f"give IMAGE's, e.g. {option} {example}" + (
                                    f"; the mask needs none (or give both, IMAGE first, '-' for one not stated: "
                                    f"{option} {example} -)" if n_inputs == 2 else ""))
    if option == "--modalities":
        _check_modality_names(given, unstated_ok=True)
    return [None if c == "-" else c for c in given] + [None] * (n_inputs - len(given))


def _refuse_pictures(*paths: Any) -> None:
    """Refuse a 2-D picture given to ``medfuse fuse``, saying which commands fuse 2-D images.

    Why: the reader's "not a medical image: neither DICOM nor a NIfTI/MetaImage/NRRD file" listed only 3-D
    formats, and the docs once said ``fuse`` writes PNGs; 2-D pairs go to ``medfuse evaluate --pair`` (PNG) or
    :func:`medfuse.fuse` on arrays.

    Raises:
        InvalidInputError: an input file whose name ends in a picture ending (.png, .jpg, ...).
    """
    from .io import _PICTURE_ENDINGS  # those medfuse.load refuses too

    for p in paths:
        if p is None or not os.path.isfile(p):
            continue
        name = os.fspath(p).lower()
        ending = next((e for e in _PICTURE_ENDINGS if name.endswith(e)), None)
        if ending is not None:
            raise InvalidInputError(f"a 2-D picture ({ending}), not a 3-D medical image: 'medfuse fuse' reads NIfTI, "
                                    "MetaImage and NRRD files and DICOM folders",
                                    fix="fuse 2-D PNG images with 'medfuse evaluate --pair A.png B.png --methods "
                                        "max --out DIR' (it writes DIR/<method>/*.png), or in Python with "
                                        "medfuse.fuse on the images' arrays", path=p)


def _cmd_fuse(args: argparse.Namespace) -> int:
    from .pipeline import fuse_files
    from .provenance import sidecar_path

    _check_device_name(args.device)
    if args.fallback and args.method != "network":
        # As --weights with a rule is refused: the option would be ignored without a word.
        raise InvalidInputError(f"--fallback names the rule to use when the network cannot run, but --method is "
                                f"{args.method}, a classical rule", fix="drop --fallback, or use --method network")
    args.outputs = _Outputs(args.output, sidecar_path(args.output))
    _check_readable(args.fixed, *args.moving)
    _refuse_pictures(args.fixed, *args.moving)
    n_inputs = 1 + len(args.moving)
    display = _display_options(args)
    _check_modalities_option(args, n_inputs)
    _check_series_option(args, n_inputs)
    body = _body_option(args)
    if getattr(args, "keep_identity", False):  # in the option's own words, before the inputs are loaded
        from .pipeline import check_identity_kept

        check_identity_kept(args.output, args.fixed, option="--keep-identity")
    with _CancelOnSigint() as token, _Bar("fuse", enabled=_bar_enabled(args)) as bar, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MedfuseWarning)
        try:
            res = fuse_files(args.fixed, args.moving, args.output, register=_kind(args.register),
                             method=args.method, device=args.device, overwrite=args.overwrite,
                             fallback=args.fallback, threads=args.threads, modalities=args.modalities,
                             series=args.series, weights=args.weights, progress=bar, cancel=token,
                             deidentify=not getattr(args, "keep_identity", False), suv=args.suv, body=body,
                             **display)
        except MedfuseError as e:
            raise _cli_error(e, _series_by_input(args)) from None
    _show_warnings(caught, args)
    for option in res.provenance.get("normalisation_unused") or ():  # asked for and applying to no input
        _say(args, f"  note: --{option.replace('_', '-')} was not used: no input is "
                   f"{'a CT in HU' if option == 'ct_window' else 'a PET in SUV'}")
    used = res.provenance.get("method_used", args.method)
    _say(args, f"fused {1 + len(args.moving)} volumes (method {used}) in {res.seconds:.1f} s")
    if _kind(args.register) is None:
        _say(args, _unregistered_note(args, caught))
    for i, rep in enumerate(res.registrations):
        if rep:
            # Numbered as the suspect warning (on stderr, which -q keeps) numbers them, and said there alone.
            _say(args, f"  registration of input {i + 2} onto input 1 ({rep.get('kind', args.register)}): "
                       f"{_registration_text(rep)}{'; looks suspect (see the warning)' if rep.get('suspect') else ''}")
            _say_notes(args, rep, f"input {i + 2} and input 1")
    # Two PETs, the first taken as the baseline: why their SUVs do not compare, as register and resample say it.
    notes = list(res.provenance.get("comparability") or [])
    _say_notes(args, {"notes": notes}, "")
    _say(args, f"wrote {res.output}\nwrote {res.sidecar} (provenance)")
    if args.json:  # each registration's report as the sidecar records it (null for an input not registered)
        _print_json(args, {"command": "fuse", "outputs": {"image": os.fspath(res.output),
                                                          "sidecar": os.fspath(res.sidecar)},
                           "method_used": used, "registrations": list(res.registrations), "notes": notes,
                           "seconds": round(res.seconds, 3), "warnings": _warning_texts(caught, args)})
    return EXIT_OK


def _display_options(args: argparse.Namespace) -> Dict[str, Any]:
    """``fuse --ct-window LEVEL WIDTH`` and ``--suv-range LOW HIGH`` as fuse_files' ``ct_window`` and
    ``suv_range``, checked before any work in the options' own words (the pipeline's NormaliseStep speaks of its
    keywords); {} when neither.

    Raises:
        InvalidInputError: a width that is not above 0, or a range whose LOW is not below HIGH.
    """
    import math

    shown = {}
    if args.ct_window is not None:
        level, width = args.ct_window
        if not (math.isfinite(level) and math.isfinite(width) and width > 0):
            raise InvalidInputError(f"--ct-window: the width must be a number above 0 HU, got {width:g}",
                                    fix="give LEVEL then WIDTH in HU, e.g. --ct-window 40 400 (soft tissue)")
        shown["ct_window"] = (level, width)
    if args.suv_range is not None:
        low, high = args.suv_range
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise InvalidInputError(f"--suv-range: LOW must be below HIGH, got {low:g} and {high:g}",
                                    fix="give LOW then HIGH in the PET's SUV unit, e.g. --suv-range 0 10")
        shown["suv_range"] = (low, high)
    return shown


def _unregistered_note(args: argparse.Namespace, caught: Sequence[warnings.WarningMessage]) -> str:
    """What ``fuse --register none`` did with the inputs' placement, in one line: nothing said that they were not
    registered (the bundled MR + PET, 9.5 degrees and 14 mm apart, fused without a word). Where their frames of
    reference are unknown (a file that is not DICOM has none) nothing checked it either: said more strongly."""
    from .pipeline import _is_plain_file

    if any("different DICOM frames of reference" in str(w.message) for w in caught):
        return "  not registered (--register none): see the warning about their frames of reference"
    if any(_is_plain_file(p) for p in (args.fixed, *args.moving)):
        return ("  not registered (--register none): the inputs were taken as aligned as their scanner coordinates "
                "place them, and nothing checked it (a file that is not DICOM records no frame of reference); add "
                "--register rigid if they come from different sessions or scanners")
    return "  not registered (--register none): the inputs were taken as aligned as the scanners placed them"


# ----------------------------------------------------------------------------- measure
def _unit_words(unit: Optional[str]) -> str:
    """A unit as it is read after a number (``arbitrary`` is no word to read after one)."""
    return "arbitrary units" if unit in (None, "arbitrary") else unit


def _number(x: float) -> Optional[float]:
    """A figure for JSON: NaN and infinity (which JSON lacks) as null."""
    import math

    return float(x) if math.isfinite(x) else None


def _coords(values: Sequence[float], unit: str = "") -> str:
    """``x 10.5, y -20, z 30 mm``: each coordinate named, for a screen reader (a bare tuple reads as a list of
    numbers without saying which is which)."""
    names = "ijk" if not unit else "xyz"
    return ", ".join(f"{n} {v:.6g}" for n, v in zip(names, values)) + (f" {unit}" if unit else "")


def _cmd_measure(args: argparse.Namespace) -> int:
    """``medfuse measure``: the value at points (--at) and statistics within a mask (--mask)."""
    from .measure import _index, mask_statistics, region_statistics, value_at, voxel_index

    if not args.at and args.mask is None:
        raise InvalidInputError("nothing to measure: give a point, a mask or both",
                                fix="add --at X Y Z (mm, LPS; --voxel for indices) or --mask MASK")
    if args.label is not None and args.mask is None:
        raise InvalidInputError("--label picks a label of the --mask, and no --mask was given",
                                fix="add --mask LABELS, or leave out --label")
    if args.reference is not None and args.mask is None:
        raise InvalidInputError("--reference picks a label of the --mask, and no --mask was given",
                                fix="add --mask LABELS, or leave out --reference")
    if args.transform and args.mask is None:
        raise InvalidInputError("--transform carries the --mask onto the image, and no --mask was given",
                                fix="add --mask MASK, or leave out --transform")
    _check_threshold(args)
    inputs = [args.image] + ([args.mask] if args.mask is not None else [])
    _check_readable(*inputs, *(args.transform or []))
    chain = _transform_chain(args.transform or [], inverse=args.inverse)
    _check_transform_direction(args)
    # One label and no reference: the single block (and JSON shape) measure has always given.
    several = args.reference is not None or len(args.label or []) > 1
    picks = _measure_choices(args, "--series", len(inputs), "PT")
    modalities = _measure_choices(args, "--modalities", len(inputs), "PT")
    space = "voxel" if args.voxel else "ras" if args.ras else "lps"
    body = _body_option(args)
    from .pipeline import _load_with_body, _warn_body_unused

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MedfuseWarning)
        try:
            # The body is the measured PET's: the mask is loaded without it.
            image, *mask = (_load_with_body(p, body if i == 0 else None, series_uid=pick, modality=m,
                                            suv=args.suv or "auto")
                            for i, (p, pick, m) in enumerate(zip(inputs, picks, modalities)))
            _warn_body_unused([image], body)
            points = []
            for at in args.at or []:
                value = value_at(image, at, space=space, interpolation=args.interpolation)
                # The voxel read (nearest), or where between the voxel centres the value was taken (linear).
                ijk = list(voxel_index(image, at, space=space)) if args.interpolation == "nearest" else \
                    [round(float(c), 3) for c in _index(image, at, space)]
                lps = image.index_to_world(at) if args.voxel else [-at[0], -at[1], at[2]] if args.ras else at
                points.append({"at": list(at), "space": space, "value": _number(value), "voxel": ijk,
                               "lps_mm": [round(float(c), 3) for c in lps]})
            regions = region_statistics(image, mask[0], labels=args.label, reference=args.reference,
                                        transform=chain) if mask and several else None
            stats = mask_statistics(image, mask[0], label=args.label[0] if args.label else None,
                                    threshold=args.threshold, transform=chain) if mask and not several else None
        finally:
            _show_warnings(caught, args)
    unit = image.unit
    if args.json:
        _print_json(args, _measure_record(args, image, points, stats, caught, regions=regions))
        return EXIT_OK
    # One fact per line, each saying what it is and its unit: read aloud, a line stands on its own. Printed under
    # -q too: the figures are what the command is for.
    _print_blanked(args, f"image {args.image}: modality {image.modality}, unit {unit}")
    for pt in points:
        value = "not a number" if pt["value"] is None else f"{pt['value']:.6g} {_unit_words(unit)}"
        if space == "voxel":
            where = f"voxel {_coords(pt['at'])} ({_coords(pt['lps_mm'], 'mm LPS')})"
        else:
            where = _coords(pt["at"], "mm " + space.upper())
        if args.interpolation == "nearest":
            read = f"; read from voxel {_coords(pt['voxel'])} (nearest voxel)"
        else:
            read = f"; at voxel {_coords(pt['voxel'])} (linear interpolation)" if space != "voxel" else \
                " (linear interpolation)"
        _print_blanked(args, f"value {value} at {where}{read}")
    how = "through the inverse of --transform" if args.inverse else "through --transform" if chain is not None \
        else "as the scanners placed the two"
    if stats is not None:
        which = ("non-zero voxels" if args.label is None else f"voxels of label {args.label[0]}") \
            if args.threshold is None else f"voxels at or above {args.threshold:g}"
        _print_mask_figures(args, stats, which, how)
    for lab, figs in (regions or {}).items():
        role = " (the reference)" if lab == args.reference else ""
        _print_mask_figures(args, figs, f"voxels of label {lab}{role}", how)
        if args.reference is not None and lab != args.reference:
            _print_blanked(args, f"  ratio to label {args.reference} {figs['ratio_to_reference']:.6g} (mean over "
                                 "the reference's mean; SUVR when the image is a PET)")
    return EXIT_OK


def _print_mask_figures(args: argparse.Namespace, stats: Mapping[str, Any], which: str, how: str) -> None:
    """One region's figures, one fact per line (``how``: how the mask was put on the image's grid)."""
    resampled = f"; put on the image's grid by nearest neighbour, {how}" if stats["mask_resampled"] else ""
    u = _unit_words(stats["unit"])
    _print_blanked(args, f"mask {args.mask}: {which}{resampled}")
    _print_blanked(args, f"  voxels {stats['count']}")
    _print_blanked(args, f"  volume {stats['volume_ml']:.4g} mL{_own_volume_text(stats)}")
    for name in ("mean", "sd", "min"):
        _print_blanked(args, f"  {name} {stats[name]:.6g} {u}")
    tied = f" ({stats['max_voxels']} voxels share it; the first is shown)" if stats["max_voxels"] > 1 else ""
    _print_blanked(args, f"  max {stats['max']:.6g} {u}, at {_coords(stats['max_at_lps_mm'], 'mm LPS')}{tied}")
    _print_blanked(args, f"  peak {stats['peak']:.6g} {u} (hottest 1 mL sphere, {stats['peak_ml']:.3g} mL of "
                         f"voxels on this grid, centred at {_coords(stats['peak_at_lps_mm'], 'mm LPS')})")
    if stats["nonfinite"]:
        _print_blanked(args, f"  left out: {stats['nonfinite']} voxels holding NaN or infinity")


def _registration_inputs(tfm: Any) -> Optional[Dict[str, Any]]:
    """The SHA-256 of the fixed and moving images (``{"fixed": ..., "moving": ...}``) that ``medfuse register``
    recorded in the sidecar it wrote with the transform file ``tfm``; None where no such sidecar is found.

    Looked for: the sidecar named after the transform (register's default ``OUT.tfm`` beside ``OUT.json``), then
    the other JSON files of its folder (``--transform`` named apart from the output). A sidecar counts only where
    the SHA-256 it records for the transform is the file's: a transform written since is not judged by it.
    """
    import json

    from . import provenance as prov

    tfm = Path(tfm)
    try:
        sha = prov.hash_path(tfm)
        folder = sorted(tfm.parent.glob("*.json"))[:256]  # a batch folder: a bounded look, not a scan
    except (MedfuseError, OSError):
        return None
    # register's OUT.json beside OUT.tfm, and batch --keep-registered's <name>_registered.json beside <name>.tfm.
    named = [prov.sidecar_path(tfm), tfm.with_name(tfm.name[: -len(tfm.suffix)] + "_registered.json")]
    for side in dict.fromkeys([*named, *folder]):
        try:
            if not side.is_file() or side.stat().st_size > (4 << 20):
                continue
            rec = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not prov.is_medfuse_record(rec) or not isinstance(rec.get("transform"), Mapping) \
                or rec["transform"].get("sha256") != sha:
            continue
        roles = {i.get("role"): i.get("sha256") for i in rec.get("inputs") or [] if isinstance(i, Mapping)}
        if roles.get("fixed") and roles.get("moving"):
            return roles
    return None


def _check_transform_direction(args: argparse.Namespace, image: Any = None, *, side: str = "IMAGE",
                               onto: str = "the mask's") -> None:
    """Refuse ``measure --transform`` (``resample --transform``) in the direction that takes the wrong voxels,
    where register's sidecar tells: the chain must take IMAGE's (REFERENCE's) points first, so that image is the
    first file's FIXED image (with --inverse, the last file's MOVING image).

    Why: ``register T1 PET --transform t.tfm`` then ``measure PET --mask labels_on_t1 --transform t.tfm`` (the
    neuro-standard run) gave a region's mean 867.4 for a true 1057.3, an SUVR 0.84 for 1.014, without a word.

    Raises:
        InvalidInputError: that image is the registration's image on the other side.
    """
    if not args.transform:
        return
    tfm = args.transform[-1] if args.inverse else args.transform[0]
    roles = _registration_inputs(tfm)
    if roles is None:  # not written by medfuse register (or its sidecar is elsewhere): nothing to tell by
        return
    from .provenance import hash_path

    digest = hash_path(args.image if image is None else image)
    wrong, right = ("fixed", "moving") if args.inverse else ("moving", "fixed")
    if digest == roles[wrong] and digest != roles[right]:
        said = f"medfuse register wrote the transform with {side} as its {wrong.upper()} image (its sidecar says so)"
        if args.inverse:
            raise InvalidInputError(f"--inverse turns the transform the wrong way: {said}, so as written it already "
                                    f"takes {side}'s points to {onto}", fix="leave out --inverse", path=tfm)
        raise InvalidInputError(f"the transform maps the other way: {said}, and {args.command} needs one that "
                                f"takes {side}'s points to {onto}",
                                fix="add --inverse (as after 'medfuse register T1 PET' with the labels on the T1 "
                                    "and the PET measured)" if side == "IMAGE" else "add --inverse", path=tfm)


def _check_threshold(args: argparse.Namespace) -> None:
    """``measure --threshold``: a finite number, with a --mask and without --label (checked before any work)."""
    import math

    if args.threshold is None:
        return
    if args.mask is None:
        raise InvalidInputError("--threshold selects the --mask's voxels at or above it, and no --mask was given",
                                fix="add --mask MASK, or leave out --threshold")
    if args.label is not None or args.reference is not None:
        option = "--label" if args.label is not None else "--reference"
        raise InvalidInputError(f"give {option} or --threshold, not both: {option} picks a value of a label map, "
                                "--threshold a probability map's voxels at or above it",
                                fix="leave out one of them")
    if not math.isfinite(args.threshold):
        raise InvalidInputError(f"--threshold must be a finite number, got {args.threshold}",
                                fix="e.g. --threshold 0.5 for a probability map (0..1)")


def _own_volume_text(stats: Mapping[str, Any]) -> str:
    """The mask's own volume beside the one measured, where they differ (the mask resampled onto the image's
    grid, or partly outside the image); "" where they agree."""
    import math

    own, outside = stats["mask_ml"], stats["outside_fraction"]
    if math.isclose(own, stats["volume_ml"], rel_tol=1e-6, abs_tol=1e-9) and not outside:
        return ""
    beyond = f", {100 * outside:.1f} % of it outside the image" if outside else ""
    return f" measured (the mask's region: {own:.4g} mL on its own grid{beyond})"


def _measure_record(args: argparse.Namespace, image: Any, points: List[Dict[str, Any]],
                    stats: Optional[Mapping[str, Any]], caught: Sequence[warnings.WarningMessage], *,
                    regions: Optional[Mapping[int, Mapping[str, Any]]] = None) -> Dict[str, Any]:
    """``measure --json``: the figures and how they were made (the image's SHA-256, the SUV factor it was read
    with, the mask's and transforms' SHA-256, the versions), as a sidecar records a command's inputs.

    ``regions`` (several --label, or --reference): ``mask`` holds ``regions``, one dict per label with its
    ``ratio_to_reference``, and ``reference``, in place of one region's figures."""
    from .provenance import hash_path, versions

    record: Dict[str, Any] = {"command": "measure", "image": os.fspath(args.image),
                              "image_sha256": hash_path(args.image), "modality": image.modality, "unit": image.unit}
    if str(image.unit).startswith("SUV"):  # the multiplier of the stored values, to check against the console's
        record.update(suv_factor=image.provenance.get("suv_factor"),
                      suv_factor_unit=_suv_factor_unit(image) or None,
                      suv_source=image.provenance.get("suv_source"))
    if _body_given(args):
        record["body"] = _body_given(args)
    record.update(interpolation=args.interpolation, points=points)
    if stats is not None:
        record["mask"] = {"path": os.fspath(args.mask), "sha256": hash_path(args.mask), **stats}
    if regions is not None:
        record["mask"] = {"path": os.fspath(args.mask), "sha256": hash_path(args.mask),
                          "regions": list(regions.values()), "reference": args.reference}
    if args.transform:
        record["transforms"] = [{"path": os.fspath(t), "sha256": hash_path(t)} for t in args.transform]
        if args.inverse:  # as resample's sidecar records it: only when the files were inverted
            record["inverse"] = True
    record["versions"] = versions()
    record["warnings"] = _warning_texts(caught, args)
    return record


# ----------------------------------------------------------------------------- evaluate / train
def _delegate(module: str, what: str, prog: str) -> Callable[[argparse.Namespace], int]:
    """Run ``module.add_arguments`` / ``module.run`` on the remaining arguments, imported only when used
    (so that ``medfuse --help`` never loads torch)."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        rest = _take_common_flags(args)
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing = getattr(e, "name", None) or str(e)
            raise MedfuseError(f"'medfuse {what}' is not available: {module} could not be imported "
                               f"(missing: {missing})",
                               fix="install the full set of extras: pip install 'medfuse[all]'") from None
        # The exit codes and --debug, as every other command's help gives them.
        # Examples first, as every other command's help gives them (train's and evaluate's gave none).
        examples = getattr(mod, "HELP_EXAMPLES", "")
        parser = _Parser(prog=prog, description=(mod.__doc__ or "").strip().splitlines()[0]
                                         if mod.__doc__ else None,
                         epilog=(examples + "\n" if examples else "") + _EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(parser)
        _plain_help(parser)
        no_bar = args.quiet
        if "--no-progress" not in parser._option_string_actions:  # train: taken here, as every command takes it
            end = rest.index("--") if "--" in rest else len(rest)
            no_bar = no_bar or "--no-progress" in rest[:end]
            rest = [a for a in rest[:end] if a != "--no-progress"] + rest[end:]
        try:
            sub = parser.parse_args(rest)
        except SystemExit as e:
            return EXIT_OK if e.code in (0, None) else EXIT_USAGE
        sub.debug, sub.quiet = args.debug, args.quiet
        sub.argv = rest  # the command's own options, e.g. for the ``trained_by`` record of ``medfuse train``
        from .progress import text_bar_allowed

        no_bar = no_bar or not text_bar_allowed()
        if no_bar and hasattr(sub, "no_progress"):
            sub.no_progress = True  # "print only errors", or MEDFUSE_NO_PROGRESS: no progress bar either
        with _TermAsInterrupt(), _WarningsAsLines(args), _not_a_terminal(no_bar and not hasattr(sub, "no_progress")):
            return int(mod.run(sub) or 0)

    return handler


#: Characters of the delegated modules' docstrings and help texts, in plain ASCII (a braille display or a C
#: locale showed ``K\u00d7K`` as garbage).
_ASCII_WORDS = {"\u00d7": "x", "\u2013": "-", "\u2014": "-", "\u2026": "...", "\u00b1": "+-", "\u2192": "->",
                "\u2264": "<=", "\u2265": ">=", "\u00b5": "u", "\u00b0": " deg", "\u2018": "'", "\u2019": "'",
                "\u201c": '"', "\u201d": '"'}


def _plain_text(text: Optional[str]) -> Optional[str]:
    """``text`` as a help screen shows it: reStructuredText's double backquotes dropped (``medfuse train``
    opened train's help) and other characters in ASCII."""
    import unicodedata

    if not text:
        return text
    text = text.replace("``", "")
    text = "".join(_ASCII_WORDS.get(c, c) for c in text)
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _plain_help(parser: argparse.ArgumentParser) -> None:
    """Put a delegated command's description, epilog and option help in plain ASCII (:func:`_plain_text`)."""
    parser.description, parser.epilog = _plain_text(parser.description), _plain_text(parser.epilog)
    for action in parser._actions:
        if isinstance(action.help, str) and action.help is not argparse.SUPPRESS:
            action.help = _plain_text(action.help)


class _NotATerminal:
    """``sys.stderr`` as it is, except that it says it is no terminal."""

    def __init__(self, stream: Any):
        self._stream = stream

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _not_a_terminal(hide: bool):
    """While the block runs, ``sys.stderr`` says it is no terminal when ``hide`` is true, so that a tqdm bar made
    with ``disable=None`` (train's, which has no switch of its own) draws nothing: --no-progress and
    MEDFUSE_NO_PROGRESS turn it off as they do every other command's bar."""
    if not hide:
        yield
        return
    saved = sys.stderr
    sys.stderr = _NotATerminal(saved)
    try:
        yield
    finally:
        if isinstance(sys.stderr, _NotATerminal):  # the command may have replaced it: left as it is then
            sys.stderr = saved


class _WarningsAsLines:
    """While a delegated command (train, evaluate) runs, a :class:`MedfuseWarning` it does not print itself is shown
    as it happens, as ``medfuse: warning: ...`` with the inputs' identifiers blanked, like every other command's;
    other warnings as Python shows them. Python's own form (``/path/cli.py:854: MedfuseWarning: ...`` and a source
    line) came on top of train's own log line. The earlier ``warnings.showwarning`` comes back on exit."""

    def __init__(self, args: argparse.Namespace):
        self._args = args
        self._saved: Any = None

    def __enter__(self):
        self._saved = warnings.showwarning
        warnings.showwarning = self._show
        return self

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MedfuseWarning):
            _show_warnings([warnings.WarningMessage(message, category, filename, lineno)], self._args)
        else:
            self._saved(message, category, filename, lineno, file, line)

    def __exit__(self, *exc):
        warnings.showwarning = self._saved
        return False


class _TermAsInterrupt:
    """SIGTERM (and SIGUSR1/2, see :func:`_warning_signals`) raises KeyboardInterrupt, as Ctrl-C does, around every command (inside their cancel blocks
    :class:`_CancelOnSigint` takes over) and around the commands that take no cancel token (train, evaluate):
    they then exit 130 and say so, as the help promises. SIGTERM ended them with -15 and no word (a scheduler's
    time limit looked like a crash). The earlier handler comes back on exit."""

    def __enter__(self):
        self._old = {}
        sigterm = getattr(signal, "SIGTERM", None)
        for s in ((sigterm,) if sigterm is not None else ()) + _warning_signals():
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                break
        return self

    _handler = staticmethod(_raise_interrupt)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        self._old = {}
        return False


def _take_common_flags(args: argparse.Namespace) -> List[str]:
    """``args.rest`` without ``--debug``/``-q``/``--quiet``, which set ``args.debug``/``args.quiet`` instead.

    Why: the help promises them after any command, and the delegated parsers do not know them. Anything after a
    bare ``--`` is left alone.
    """
    rest = list(args.rest)
    end = rest.index("--") if "--" in rest else len(rest)
    head, tail = rest[:end], rest[end:]
    args.debug = bool(getattr(args, "debug", False)) or "--debug" in head
    args.quiet = bool(getattr(args, "quiet", False)) or "-q" in head or "--quiet" in head
    return [a for a in head if a not in ("--debug", "-q", "--quiet")] + tail


# ----------------------------------------------------------------------------- batch
def _cmd_batch(args: argparse.Namespace) -> int:
    from .batch import run_batch, write_manifest
    from .progress import text_bar_allowed

    dataset = Path(args.manifest).is_dir()
    if not dataset and (args.out is not None or args.write_manifest is not None):
        raise InvalidInputError(f"--{'out' if args.out is not None else 'write-manifest'} is for a dataset folder; "
                                "a manifest names each output itself", fix="leave it out", path=args.manifest)
    if dataset and args.write_manifest is not None:
        from .errors import OutputExistsError

        try:
            written = write_manifest(args.manifest, args.write_manifest or None, out_dir=args.out,
                                     register=args.register, method=args.method if args.method != "network" else None)
        except OutputExistsError as e:
            if e.fix and "overwrite" in e.fix:
                # write_manifest takes no overwrite (yet): "add --overwrite" sent the user round in circles.
                raise OutputExistsError(e.problem, fix="--write-manifest never replaces a file: move it away or "
                                        "give another PATH", path=e.path) from None
            raise
        # --register and --method given now are the manifest's columns; what a manifest cannot hold (--fallback,
        # --device) or was not given goes on the next command.
        rest = [] if args.register else ["--register rigid|none"]
        rest += [f"--fallback {args.fallback}"] if args.fallback else []
        rest += [f"--device {args.device}"] if args.device not in (None, "cpu") else []
        _say(args, f"wrote {written} (review it, then: medfuse batch {_shell_quote(written)}"
                  + "".join(f" {r}" for r in rest) + ")")
        return EXIT_OK
    if dataset and args.register is None:
        # Discovery pairs files by name: whether they are aligned (one session) or not is the user's to say;
        # fusing images from two sessions unregistered gives a misaligned overlay.
        raise InvalidInputError("a dataset folder needs --register: medfuse cannot tell whether each subject's "
                                "images are already aligned", fix="add --register rigid (images from different "
                                "sessions or scanners) or --register none (already aligned, e.g. one PET/CT)",
                                path=args.manifest)
    _check_device_name(args.device)  # --device gpu with a classical method ran every subject silently
    _check_device(args)
    with _CancelOnSigint(raise_on_exit=False) as token, \
            warnings.catch_warnings(record=True) as caught:  # a cancelled batch still prints its summary
        warnings.simplefilter("always", MedfuseWarning)
        summary = run_batch(args.manifest, workers=args.workers, scheduler=args.scheduler,
                            threads_per_worker=args.threads_per_worker, register=_kind(args.register),
                            method=args.method, device=args.device, fallback=args.fallback,
                            overwrite=args.overwrite, report=args.report,
                            progress=_bar_enabled(args) is None and text_bar_allowed(),
                            cancel=token, out_dir=args.out, suv=args.suv,
                            keep_registered=args.keep_registered)
    _show_warnings(caught, args)
    if not args.quiet:
        print(summary.table())
        # Collected per subject (blanked) on every worker; a warning repeated by many subjects is one line with
        # their count (a 3,000-subject run printed one line each).
        for line in summary.warning_lines():
            print(f"medfuse: warning: {line}", file=sys.stderr)
        if summary.report_path is not None:
            print(f"report: {summary.report_path}")
    failed = summary.count("failed")
    if failed:
        # On stderr with or without -q: a cron job or a wrapper that keeps stderr saw no word of a failure when the
        # table (stdout) was all that said it.
        complete = summary.count("done") + summary.count("skipped")
        print(f"medfuse batch: {failed} of {len(summary.results)} subject(s) failed, {complete} complete:",
              file=sys.stderr)
        if failed <= 20:
            for r in summary.results:  # named here too: a job that keeps stderr alone never sees the table
                if r.status == "failed":
                    print(f"  {r.subject}: {r.error}", file=sys.stderr)
        else:  # a thousand failures are a few reasons: the report names every subject
            for n, why in summary.reasons():
                print(f"  {n} x {why}", file=sys.stderr)
        if summary.report_path is not None:
            print(f"report: {summary.report_path}", file=sys.stderr)
    if summary.cancelled or token.cancelled:
        print("medfuse batch: cancelled; the subjects marked done or skipped are complete, the others were not "
              "written (rerun the same command to finish them)", file=sys.stderr)
        return EXIT_CANCELLED
    return EXIT_FAILURES if summary.n_failed or summary.n_cancelled else EXIT_OK


# ----------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
    _check_device_name(args.device)
    _check_device(args)
    out = Path(args.out)
    args.outputs = _Outputs(*(out / n for n in ("fused.nii.gz", "fused.json", "fused.png",
                                                f"pet_to_{args.anatomy}.tfm")))
    with _CancelOnSigint() as token, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MedfuseWarning)
        result = run_demo(args.out, method=args.method, device=args.device, samples=args.samples,
                          anatomy=args.anatomy, progress_enabled=_bar_enabled(args), cancel=token)
    _show_warnings(caught, args)
    for line in result["lines"]:
        _say(args, line)
    return EXIT_OK


def snapshot_png(volume, path, *, center_world=None, overwrite: bool = False, mm_per_pixel: float = 0.5) -> Path:
    """Write a PNG of three orthogonal slices (axial, coronal, sagittal) through ``center_world``.

    Radiological display: patient left on the image's right, anterior up (axial), superior up.
    Pixels are resampled to square millimetres so that anisotropic grids are not distorted.

    Args:
        volume: the Volume to show.
        path: the PNG to write (atomically).
        center_world: LPS mm point the slices pass through (default: the brightest voxel).
        overwrite: replace an existing PNG.
        mm_per_pixel: output resolution.
    """
    from PIL import Image

    from .display import orthogonal_snapshot
    from .io._atomic import atomic_path

    # Planes resampled through the point in patient orientation (radiological, labelled), whatever the voxel
    # order: slicing the array drew LAS/RAS-stored volumes mirrored or upside down.
    canvas = Image.fromarray(orthogonal_snapshot(volume, center_world, mm_per_pixel=mm_per_pixel))
    # The fused volume's source files: a picture of a private (chmod 600) scan is no more readable than it.
    sources = [volume.provenance.get("source"), *volume.provenance.get("sources", [])]
    with atomic_path(path, overwrite=overwrite, inputs=[x for x in sources if isinstance(x, str)]) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


_DEMO_MARK = ".medfuse-demo"


def _claim_demo_folder(out: Path, names: Sequence[str]) -> None:
    """Make ``out`` the demo's folder, where it rewrites its own files on every run (``make demo`` twice), and
    refuse, before any work, a folder where files of those names were not written by the demo (a user's own
    ``fused.nii.gz``). The demo's folder carries a marker file; folders of demos run before it existed are
    recognised by their ``fused.json``."""
    from .errors import OutputExistsError

    if out.exists() and not out.is_dir():
        raise OutputExistsError("a file is in the way of the demo's output folder", fix="choose another --out",
                                path=out)
    if (out / _DEMO_MARK).is_file() or _earlier_demo(out):
        taken = []
    else:
        taken = [n for n in names if os.path.lexists(out / n)]
    if taken:
        raise OutputExistsError(f"the folder holds {', '.join(taken)}, not written by medfuse demo (the demo "
                                "rewrites only its own files)", fix="choose another --out, or move those files "
                                "away", path=out)
    out.mkdir(parents=True, exist_ok=True)
    mark = out / _DEMO_MARK
    if not mark.is_file():
        mark.write_text("This folder is medfuse demo's output: 'medfuse demo' rewrites its files here on every run.\n",
                        encoding="utf-8")


def _earlier_demo(out: Path) -> bool:
    """Whether ``out/fused.json`` is the sidecar of a demo run (the sample MR or CT + PET, fused into
    ``out/fused.nii.gz``) made before the demo marked its folder."""
    from . import provenance as prov

    try:
        rec = json.loads((out / "fused.json").read_text(encoding="utf-8"))
        names = [Path(i["path"]).name for i in rec["inputs"]]
        return (prov.is_medfuse_record(rec) and Path(rec["output"]["path"]).name == "fused.nii.gz"
                and len(names) == 2 and names[0] in ("mr_t1.nii.gz", "ct") and names[1] == "pet")
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_demo(out: Any, *, method: str = "network", device: str = "cpu", samples: Any = None, anatomy: str = "mr",
             progress_enabled: Optional[bool] = None, cancel: Any = None) -> dict:
    """The ``medfuse demo`` work: sample MR T1 (or CT) + FDG PET -> rigid registration -> fusion -> files.

    Returns:
        ``{"result": PipelineResult, "files": {name: Path}, "lesion_center": array or None, "lines": [...]}``.
    """
    from .phantom import default_samples_folder

    out = Path(out)
    if anatomy not in ("mr", "ct"):
        raise InvalidInputError(f"unknown anatomy {anatomy!r}", fix="use mr or ct")
    folder = Path(samples) if samples else default_samples_folder()
    if samples and folder.exists() and not folder.is_dir():
        raise InvalidInputError("--samples takes a folder, and this is a file", fix="give the folder that holds the "
                                "sample volumes (python -m medfuse.phantom --write DIR makes one), or leave it out",
                                path=folder)
    if samples and not folder.is_dir():
        raise InvalidInputError("no such folder", fix="check the --samples path, or leave it out to use the bundled "
                                                      "sample volumes", path=folder)
    if samples and not (folder / "ground_truth.json").is_file():
        raise InvalidInputError("the folder holds no sample volumes (ground_truth.json is missing)",
                                fix="regenerate them: python -m medfuse.phantom --write DIR", path=folder)
    created = not os.path.lexists(out)
    _claim_demo_folder(out, ["fused.nii.gz", "fused.json", "fused.png", f"pet_to_{anatomy}.tfm"])
    try:
        return _demo_work(out, folder, method=method, device=device, anatomy=anatomy,
                          progress_enabled=progress_enabled, cancel=cancel)
    except BaseException:  # cancelled or failed: a folder this run made is not left behind empty
        if created and [p.name for p in out.iterdir()] == [_DEMO_MARK]:
            (out / _DEMO_MARK).unlink()
            out.rmdir()
        raise


def _demo_work(out: Path, folder: Optional[Path], *, method: str, device: str, anatomy: str,
               progress_enabled: Optional[bool], cancel: Any) -> dict:
    from .phantom import load_ground_truth, write_samples
    from .pipeline import fuse_files

    lines = []
    if folder is None or not (folder / "ground_truth.json").is_file():
        folder = out / "sample_volumes"
        if not (folder / "ground_truth.json").is_file():
            folder.mkdir(exist_ok=True)
            write_samples(folder, overwrite=True)
            lines.append(f"generated the sample volumes in {folder}")
    mr = folder / ("mr_t1.nii.gz" if anatomy == "mr" else "ct")
    pet = folder / "pet"
    files = {"fused": out / "fused.nii.gz", "png": out / "fused.png", "transform": out / f"pet_to_{anatomy}.tfm"}
    from .fusion import _ANISOTROPY_NOTE

    with _Bar("demo", enabled=progress_enabled) as bar, warnings.catch_warnings():
        # The sample CT's 4 mm slices are the demo's own choice: a warning about them on every run reads as a
        # fault of the user's set-up. fused.json still records it.
        warnings.filterwarnings("ignore", message=_ANISOTROPY_NOTE, category=MedfuseWarning)
        res = fuse_files(mr, pet, files["fused"], register="rigid", method=method, device=device,
                         fallback="laplacian" if method == "network" else None, overwrite=True,
                         progress=bar, cancel=cancel)
    files["provenance"] = res.sidecar
    res.transforms[0].save(files["transform"], overwrite=True)
    # The other anatomy's transform, from an earlier run in this (the demo's own) folder, no longer matches
    # fused.*: left there, the folder read as one consistent set and was not.
    stale = out / f"pet_to_{'ct' if anatomy == 'mr' else 'mr'}.tfm"
    if stale.is_file() and not stale.is_symlink():
        stale.unlink()
        lines.append(f"removed {stale.name} (an earlier demo run's, with the other anatomy)")
    gt = load_ground_truth(folder)
    center = gt["lesion"]["center_lps_mm"] if gt.get("lesion") else None
    snapshot_png(res.fused, files["png"], center_world=center, overwrite=True)
    rep = res.registrations[0] or {}
    used = res.provenance.get("method_used", method)
    lines += [
        f"medfuse demo: fused {'MR T1' if anatomy == 'mr' else 'CT'} ({mr.name}) + FDG PET ({pet.name}/, SUVbw)"
        f" from {folder}",
        f"  registration (rigid, PET onto {anatomy.upper()}): metric {rep.get('metric_before', float('nan')):.3f} -> "
        f"{rep.get('metric_after', float('nan')):.3f}, rotation {rep.get('rotation_deg') or 0:.1f} deg, "
        f"translation {rep.get('translation_mm') or 0:.1f} mm{'  SUSPECT' if rep.get('suspect') else ''}",
        *_demo_truth_error(res, gt, anatomy),
        f"  fusion method: {used}" + (f" (network unavailable, fell back; see {files['provenance'].name})"
                                      if used != method else ""),
        f"  total {res.seconds:.1f} s",
        f"wrote {files['fused']}  (fused volume, NIfTI)",
        f"wrote {files['png']}  (axial, coronal, sagittal slices through the lesion)",
        f"wrote {files['provenance']}  (provenance: versions, hashes, registration report, timings)",
        f"wrote {files['transform']}  (rigid transform of the PET onto the {anatomy.upper()}: ITK .tfm, mapping "
        f"{anatomy.upper()} points to PET points)",
    ]
    return {"result": res, "files": files, "lesion_center": center, "lines": lines}


def _demo_truth_error(res: Any, gt: Mapping[str, Any], anatomy: str) -> List[str]:
    """How far the demo's registration is from the samples' known misalignment (ground_truth.json), in mm: at the
    lesion and over the head (the fused volume's voxels above a tenth of its maximum); a line, or none where the
    truth or the transform is missing.

    Why: the demo printed a rotation and a translation that nobody could judge without reading the JSON.
    """
    import numpy as np

    transform = res.transforms[0] if res.transforms else None
    if transform is None or gt.get("mr_to_pet") is None or (anatomy == "ct" and gt.get("mr_to_ct") is None):
        return []
    mr_to_fixed = np.eye(4) if anatomy == "mr" else np.asarray(gt["mr_to_ct"], dtype=float)
    truth = np.asarray(gt["mr_to_pet"], dtype=float) @ np.linalg.inv(mr_to_fixed)  # fixed point -> PET point
    found = transform.matrix

    def error(points: Any) -> Any:
        moved = [points @ m[:3, :3].T + m[:3, 3] for m in (found, truth)]
        return np.linalg.norm(moved[0] - moved[1], axis=-1)

    arr = res.fused.array
    step = max(1, min(arr.shape) // 32)  # about 32 points a side: enough for a mean, in milliseconds
    sample = arr[::step, ::step, ::step]
    head = error(res.fused.index_to_world(np.argwhere(sample > 0.1 * float(np.nanmax(sample))) * step))
    parts = []
    lesion = gt.get("lesion") or {}
    if lesion.get("center_lps_mm") is not None:
        centre = mr_to_fixed[:3, :3] @ np.asarray(lesion["center_lps_mm"], dtype=float) + mr_to_fixed[:3, 3]
        parts.append(f"{float(error(centre)):.1f} mm at the lesion")
    if head.size:
        parts.append(f"{float(head.mean()):.1f} mm mean over the head (largest {float(head.max()):.1f} mm)")
    if not parts:
        return []
    return [f"  error against the samples' known misalignment (ground_truth.json): {', '.join(parts)}"]


# ----------------------------------------------------------------------------- parser
# Warnings stay under -q: they are about the data (different frames of reference, PET left in Bq/mL).
_QUIET_HELP = "print only warnings and errors (no progress, no lines about what was written)"
_JSON_HELP = ("print one JSON object on stdout (outputs written, registration figures as the sidecar records them, "
              "seconds, warnings); the lines a person reads go to stderr")

#: What each fusion method does, one line of at most 80 characters each in 'medfuse fuse --help' (a method without
#: a line is listed bare). docs/fusion.md says more.
_METHOD_LINES = {
    "network": "the trained fusion network (needs torch; see --fallback)",
    "mean": "voxel-wise average of the normalised inputs",
    "max": "voxel-wise maximum: the brightest input wins (PET uptake, CT bone)",
    "laplacian": "Laplacian pyramid: the stronger detail at each scale",
    "wavelet": "wavelet transform: the stronger detail coefficient at each scale",
    "gff": "guided-filter fusion: edge-aware weights (input order matters)",
}


def _methods_text() -> str:
    """The fusion methods, one line each, for a command's description."""
    width = max(len(m) for m in _METHODS)
    return "methods (--method):\n" + "".join(f"  {m:<{width}}  {_METHOD_LINES.get(m, '')}".rstrip() + "\n"
                                             for m in _METHODS)
_NO_PROGRESS_HELP = "no progress bar (MEDFUSE_NO_PROGRESS=1 in the environment turns it off for every command)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    from .fusion.normalise import DEFAULT_CT_WINDOW, DEFAULT_SUV_MAX, SUVBSA_MAX

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks on errors")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=_QUIET_HELP)
    # Every command takes it, those without a bar too (info, resample): a wrapper passes it to any command.
    common.add_argument("--no-progress", action="store_true", default=False, help=_NO_PROGRESS_HELP)

    parser = _Parser(prog="medfuse", description=_DESCRIPTION, epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"medfuse {_version()}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def add(name: str, help_: str, description: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=description, parents=[common], epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    p = add("info", "show what a file or DICOM folder holds",
            "Show series, geometry (shape, spacing, origin, orientation), modality and unit of an image file\n"
            "or DICOM folder (a 4-D series: its number of volumes; a PET: where its SUV factor came from).\n"
            "A folder holding several DICOM series or image files lists them, each series with its folder;\n"
            "pick a series with --series. Never shows patient identifiers.\n\n"
            "examples:\n  medfuse info sample_volumes/pet\n  medfuse info sample_volumes\n  medfuse info sample_volumes/*.nii.gz")
    p.add_argument("path", metavar="PATH", nargs="+",
                   help="image file (.nii, .nii.gz, .mha, .nrrd) or DICOM file/folder; several are shown in turn "
                        "(with --json: a list)")
    p.add_argument("--series", metavar="S", help="the series to show when a folder holds several: its number as "
                                                 "listed (1, 2, ...), its modality (CT, MR, PT, NM) or its UID")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_suv_option(p, "auto")
    _add_body_options(p)
    _add_volume_option(p)
    p.set_defaults(func=_cmd_info)

    p = add("resample", "put MOVING on REFERENCE's grid through saved transforms (no registration)",
            "Resample MOVING onto REFERENCE's grid through one or more saved ITK transforms (.tfm, .h5, .mat,\n"
            "as register, 3D Slicer or ANTs write them: each maps points of its fixed image to points of its\n"
            "moving image), and write it with a provenance sidecar. Without --transform the images are put\n"
            "together as the scanners placed them. Uses: move a label map or a second image of the moving\n"
            "session with a transform made once; chain a follow-up onto a baseline.\n\n"
            "A chain is given from REFERENCE on: the transform whose fixed image is REFERENCE first, then the\n"
            "one that goes on from that transform's moving image, and so on to MOVING. e.g. follow-up PET onto\n"
            "baseline CT through the follow-up CT:\n"
            "  medfuse register bl_ct fu_ct -o fu_ct_on_bl.nii.gz --transform bl_to_fu.tfm\n"
            "  medfuse register fu_ct fu_pet -o fu_pet_on_fu_ct.nii.gz --transform fuct_to_fupet.tfm\n"
            "  medfuse resample bl_ct fu_pet --transform bl_to_fu.tfm fuct_to_fupet.tfm -o fu_pet_on_bl.nii.gz\n\n"
            "example:\n  medfuse resample sample_volumes/mr_t1.nii.gz sample_volumes/pet --transform "
            "sample_volumes/pet_to_mr.tfm -o pet_on_mr.nii.gz")
    p.add_argument("reference", metavar="REFERENCE", help="the image whose grid the output takes (file or DICOM folder)")
    p.add_argument("moving", metavar="MOVING", help="the image to resample (file or DICOM folder)")
    _add_image_output_option(p)
    p.add_argument("--transform", nargs="+", metavar="T", default=None,
                   help="transform file(s), REFERENCE side first (default: none, the scanners' placement)")
    p.add_argument("--inverse", action="store_true",
                   help="apply the inverse of the --transform chain: for transforms written the other way round "
                        "(MOVING points to REFERENCE points, e.g. the one that put REFERENCE on MOVING's grid); "
                        "rigid and affine only (a deformable transform has no closed-form inverse)")
    p.add_argument("--interpolation", choices=("linear", "nearest", "bspline"), default=None,
                   help="linear (default; a label map is warned about), nearest (label maps, masks: keeps the "
                        "labels), or bspline (sharper, its overshoot clipped)")
    p.add_argument("--fill", type=float, default=None, metavar="V",
                   help="value outside MOVING (default: -1024 for a CT in HU, else 0)")
    p.add_argument("--spacing", nargs="+", type=float, metavar="MM", default=None,
                   help="put MOVING on REFERENCE's field of view at this voxel size instead of on REFERENCE's grid: "
                        "one number (isotropic, e.g. --spacing 1) or three (mm along the output's i, j, k), as "
                        "challenge datasets ask")
    p.add_argument("--orientation", metavar="CODE", default=None,
                   help="the axes of that grid: three letters naming where i, j and k point to (nibabel's "
                        "convention), e.g. RAS (NIfTI tools, nnU-Net) or LPS (DICOM); an oblique REFERENCE is then "
                        "covered by an axis-aligned box. Alone, the spacing is REFERENCE's finest, isotropic")
    _add_modalities_option(p, "a CT in HU is filled with air (-1024) outside its field of view")
    _add_series_option(p, "medfuse resample study/ study/ --series CT PT -o pet_on_ct.nii.gz")
    _add_suv_option(p, "auto")
    _add_body_options(p)
    _add_keep_identity_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (never an input)")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    _add_volume_option(p)
    p.set_defaults(func=_cmd_resample)

    p = add("register", "align MOVING onto FIXED and write it on FIXED's grid",
            "Register MOVING onto FIXED and write the resampled MOVING (on FIXED's grid), the ITK transform\n"
            "(.tfm, maps FIXED points to MOVING points; readable by 3D Slicer, ANTs, SimpleITK) and a\n"
            "provenance sidecar with the registration report.\n\n"
            "example:\n  medfuse register sample_volumes/mr_t1.nii.gz sample_volumes/pet -o pet_on_mr.nii.gz")
    p.add_argument("fixed", metavar="FIXED", help="reference image (file or DICOM folder)")
    p.add_argument("moving", metavar="MOVING", help="image to align (file or DICOM folder)")
    _add_image_output_option(p)
    p.add_argument("--kind", choices=_KINDS[1:], default="rigid", help="transform model (default: rigid)")
    p.add_argument("--metric", choices=("mattes", "correlation"), default="mattes",
                   help="mattes = mutual information, any modalities (default); correlation = same modality")
    p.add_argument("--transform", metavar="TFM", help="where to write the transform (default: OUT with .tfm)")
    p.add_argument("--initialise", choices=("auto", "local", "geometry", "moments", "none"), default="auto",
                   help="starting search: auto (the scanners' placement, geometry centres and moments, each turned "
                        "through the 24 axis-aligned orientations and +-30 degrees; default), local (no turned "
                        "orientations), geometry (centre-align: for unrelated scanner coordinates), moments, none")
    p.add_argument("--initial-transform", metavar="FILE", default=None,
                   help="start from this rigid/affine ITK transform (.tfm/.txt/.h5/.mat, FIXED -> MOVING points, as "
                        "medfuse, Slicer, ANTs write them); the written transform includes it")
    p.add_argument("--fill", type=float, default=None, metavar="V",
                   help="value outside MOVING's field of view in the output (default: -1024 for a CT in HU, else "
                        "0); nan marks it as no data, which measure leaves out (a PET that covers only part of "
                        "FIXED: a 0 there lowers regional means); a DICOM output cannot hold NaN and stores 0")
    _add_modalities_option(p, "it picks the registration preset, and a CT in HU is filled with air (-1024) "
                              "outside its field of view")
    _add_series_option(p, "medfuse register study/ study/ --series CT PT -o pet_on_ct.nii.gz")
    _add_suv_option(p, "auto")
    _add_body_options(p)
    _add_threads_option(p)
    _add_keep_identity_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    _add_volume_option(p)
    p.set_defaults(func=_cmd_register)

    p = add("fuse", "fuse FIXED with one or more MOVING images",
            "Load FIXED and MOVING, optionally register MOVING onto FIXED, resample onto FIXED's grid,\n"
            "normalise each to 0..1, fuse, and write OUT plus its provenance sidecar (fused.nii.gz -> fused.json).\n\n"
            "examples (from the repository root; --device cuda needs a CUDA GPU and torch built for it):\n"
            "  medfuse fuse sample_volumes/mr_t1.nii.gz sample_volumes/pet -o fused.nii.gz --register rigid\n"
            "  medfuse fuse sample_volumes/ct sample_volumes/mr_t1.nii.gz -o ct_mr.nii.gz --method laplacian"
            "  # already aligned\n"
            "  medfuse fuse sample_volumes/mr_t1.nii.gz sample_volumes/pet -o fused_gpu.nii.gz --register rigid "
            "--device cuda\n\n" + _methods_text())
    p.add_argument("fixed", metavar="FIXED", help="reference image; the output is on its grid")
    p.add_argument("moving", metavar="MOVING", nargs="+", help="image(s) to fuse with FIXED")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output (.nii.gz, .mha, .nrrd; a name without suffix writes a DICOM series folder)")
    p.add_argument("--register", choices=_KINDS, default="none",
                   help="register MOVING onto FIXED first (default: none = already aligned)")
    p.add_argument("--method", choices=_METHODS, default="network",
                   help="fusion method (default: network; what each does: 'methods' below)")
    _add_modalities_option(p, "it picks each input's normalisation and whether the network's 3-D path keeps "
                              "PET/SPECT uptake and CT bone bright")
    _add_series_option(p, "medfuse fuse study/ study/ --series CT PT -o fused.nii.gz")
    _add_suv_option(p, "SUVbw (a stored SUV of another kind converted to it where the header allows)")
    _add_body_options(p)
    p.add_argument("--fallback", choices=_METHODS[1:], default=None,
                   help="classical method to use if the network cannot run (default: fail)")
    p.add_argument("--ct-window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"), default=None,
                   help="the CT window mapped onto the fusion's 0..1 scale, in HU (a CT in HU only; default: level "
                        f"{DEFAULT_CT_WINDOW[0]:g}, width {DEFAULT_CT_WINDOW[1]:g}: soft tissue and bone edges; e.g. "
                        "--ct-window 400 1800 for bone)")
    p.add_argument("--suv-range", nargs=2, type=float, metavar=("LOW", "HIGH"), default=None,
                   help="the PET SUV range mapped onto the fusion's 0..1 scale, values outside it clipped (a PET in "
                        f"SUV only; default: 0 to {DEFAULT_SUV_MAX:g}, 0 to {SUVBSA_MAX:g} for SUVbsa)")
    p.add_argument("--weights", metavar="FILE", default=None,
                   help="network weights (.safetensors) to use instead of the shipped ones, e.g. what 'medfuse "
                        "train' exported (--method network only; its SHA-256 goes into the sidecar)")
    _add_device_option(p)
    _add_threads_option(p)
    _add_keep_identity_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (never an input)")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    _add_volume_option(p)
    p.set_defaults(func=_cmd_fuse)

    p = add("measure", "the value at a point, or statistics within a mask, in the image's unit",
            "Print the image's value at points (--at, repeatable) and statistics of the voxels a mask selects\n"
            "(--mask): count, volume in mL, mean, SD, min, max and the peak (the hottest 1 mL sphere centred\n"
            "in the region: PERCIST's SUVpeak), in the image's unit (HU, SUVbw, ...). One fact per line, each\n"
            "naming what it is; --json prints one JSON object instead, with the image's SHA-256, its SUV\n"
            "factor and medfuse's version.\n\n"
            "Points are in mm in LPS, as DICOM, ITK and 'medfuse info' give them (--ras: RAS, as 3D Slicer and\n"
            "NIfTI tools; --voxel: voxel indices i j k from 0). The value is the nearest voxel's, as napari's\n"
            "cursor readout shows it, or trilinear with --interpolation linear. A point outside the image is\n"
            "refused with the image's extent. A mask on another grid is put on the image's by nearest\n"
            "neighbour, as the scanners placed the two (register them first if they were not acquired together).\n"
            "Several labels (--label 1 2 3) give one block each; --reference N adds each one's mean over label\n"
            "N's (SUVR for a PET: e.g. cortex over cerebellum).\n\n"
            "Labels on a T1 and the PET in its own space: 'medfuse register T1 PET -o pet_on_t1.nii.gz\n"
            "--transform t.tfm' maps the T1's points to the PET's, the other way from what measure takes, so\n"
            "give --inverse. Where register's sidecar lies beside the transform file, a wrong direction is\n"
            "refused; without one, nothing can check it.\n\n"
            "examples:\n"
            "  medfuse measure sample_volumes/mr_t1.nii.gz --at 27 -14 24\n"
            "  medfuse measure sample_volumes/pet --at 32 37 32 --voxel --interpolation linear --json\n"
            "  medfuse measure sample_volumes/pet --mask lesion.nii.gz\n"
            "  medfuse measure pet.nii.gz --mask labels_on_t1.nii.gz --label 1 2 --reference 3 --transform t.tfm "
            "--inverse")
    p.add_argument("image", metavar="IMAGE", help="the image measured (file or DICOM folder)")
    p.add_argument("--at", nargs=3, type=float, action="append", metavar=("X", "Y", "Z"), default=None,
                   help="a point, in mm LPS unless --ras or --voxel; repeat for several points")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--voxel", action="store_true", help="--at gives voxel indices i j k (from 0)")
    where.add_argument("--ras", action="store_true", help="--at gives mm in RAS (x and y negated from LPS)")
    p.add_argument("--interpolation", choices=("nearest", "linear"), default="nearest",
                   help="nearest voxel (default, as napari's readout) or linear (trilinear between voxel centres)")
    p.add_argument("--mask", metavar="MASK", default=None,
                   help="a mask or label map (file or DICOM folder): statistics of the image's voxels it selects")
    p.add_argument("--label", type=int, nargs="+", action="extend", default=None, metavar="N",
                   help="the label(s) of a label map --mask to measure, one block of figures each (default: every "
                        "non-zero voxel as one region; with --reference, every label)")
    p.add_argument("--reference", type=int, default=None, metavar="N",
                   help="a label of the --mask whose mean each --label's is divided by: the ratio to label N "
                        "(SUVR when the image is a PET, e.g. N the cerebellum's or pons' label); its own figures "
                        "are printed too")
    p.add_argument("--threshold", type=float, default=None, metavar="T",
                   help="measure the --mask's voxels at or above T: for a probability map (values 0..1, e.g. "
                        "--threshold 0.5), which is refused without it; not with --label")
    p.add_argument("--transform", nargs="+", metavar="T", default=None,
                   help="transform file(s) carrying --mask onto IMAGE: what 'medfuse register IMAGE MASK_IMAGE' "
                        "wrote (IMAGE side first for a chain, as resample takes them); default: none, the "
                        "scanners' placement (right within one session, wrong across sessions)")
    p.add_argument("--inverse", action="store_true",
                   help="apply the inverse of the --transform chain, as resample --inverse does: for 'medfuse "
                        "register MASK_IMAGE IMAGE' (e.g. register T1 PET, labels on the T1, PET measured); "
                        "refused where register's sidecar beside the transform shows the other direction (no "
                        "sidecar found: not checked); rigid and affine only")
    p.add_argument("--series", nargs="+", metavar="S", default=None,
                   help="for DICOM folders holding several series: IMAGE's choice, then MASK's if it needs one: "
                        "the series' number as listed, its modality or its UID; '-' for an input that needs none")
    p.add_argument("--modalities", nargs="+", metavar="M", default=None,
                   help="IMAGE's modality (MR, CT, PT or NM), for a file that records none (a plain NIfTI): e.g. "
                        "--modalities PT; a CT NIfTI with values below -100 is then read in HU. A mask needs "
                        "none ('-' for not stated, e.g. --modalities PT -)")
    _add_suv_option(p, "auto")
    _add_body_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of lines")
    _add_volume_option(p)
    p.set_defaults(func=_cmd_measure)

    for name, module, help_ in (("evaluate", "medfuse.evaluate", "score fusion methods (metrics, references)"),
                                ("train", "medfuse.fusion.train", "train the fusion network")):
        p = sub.add_parser(name, help=help_, add_help=False, prefix_chars="\0",
                           description=f"{help_}; run 'medfuse {name} --help' for its options")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_delegate(module, name, f"medfuse {name}"))

    p = add("batch", "fuse many subjects in parallel from a CSV/YAML manifest or a dataset folder (Dask)",
            "Run the fuse pipeline over every subject of a manifest, in parallel on a Dask cluster: a local\n"
            "cluster of --workers processes by default, or an existing one with --scheduler tcp://host:8786.\n"
            "Re-runs skip up-to-date subjects and redo medfuse outputs made with other inputs, parameters or\n"
            "weights; a failing subject is reported and never stops the others. Ends with a summary table and\n"
            "a report file; exit code 1 when any subject failed.\n\n"
            "A dataset folder (one folder per subject) is read without a manifest: each subject's MR (else CT)\n"
            "is the fixed image and its PET/SPECT the moving ones, found by file names (mr, t1, T1w, BraTS's\n"
            "t1n/t1c/t2f, ct, pet, fdg, spect) and DICOM Modality; an unpaired or ambiguous subject fails alone.\n"
            "It needs an explicit\n"
            "--register (rigid for images from different sessions, none when they are already aligned).\n"
            "--write-manifest writes what discovery found as a manifest to review and edit.\n\n"
            "manifest (CSV with a header, or YAML list / {defaults:, subjects:}):\n"
            "  subject,fixed,moving,output\n"
            "  s01,s01/mr.nii.gz,s01/pet,out/s01_fused.nii.gz\n"
            "  s02,s02/mr.nii.gz,s02/pet;s02/spect.nii.gz,out/s02_fused.nii.gz\n"
            "Optional columns: register, method, series (for DICOM folders holding several series: one choice\n"
            "per image, fixed first, e.g. CT;PT), modalities (one per image, fixed first, e.g. MR PT; '-' keeps\n"
            "an image's own), labels (label maps, ';'-separated; never fused, moved with --keep-registered).\n"
            "Files named seg, dseg, mask, label(s) or roi are label maps, never images to fuse.\n"
            "Several moving images: separate with ';' (CSV) or a list\n"
            "(YAML). Relative paths are relative to the manifest's folder. See docs/pipeline.md.")
    p.add_argument("manifest", metavar="MANIFEST_OR_DATASET",
                   help="subjects.csv, subjects.yaml, or a dataset folder with one folder per subject")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="outputs' folder for a dataset folder (default DATASET/derivatives/medfuse)")
    p.add_argument("--write-manifest", metavar="PATH", nargs="?", const="", default=None,
                   help="dataset folder only: write the manifest discovery makes (default PATH: "
                        "DIR/manifest.csv, DIR from --out) and exit without fusing")
    p.add_argument("--workers", type=_bounded_count(MAX_THREADS), default=None, metavar="N",
                   help="local worker processes (default 2, or 1 where this process may use one core only; ignored "
                        "with --scheduler)")
    p.add_argument("--scheduler", default="local", metavar="ADDR",
                   help="'local' (default), 'tcp://host:port' of a running Dask scheduler, or 'synchronous' "
                        "(in this process, no Dask; for debugging)")
    p.add_argument("--threads-per-worker", type=_bounded_count(MAX_THREADS), default=1, metavar="N",
                   help="ITK/torch/BLAS threads per worker (default 1: no oversubscription)")
    p.add_argument("--register", choices=_KINDS, default=None,
                   help="default registration for rows without a 'register' column (default: none for a "
                        "manifest; a dataset folder needs it said)")
    p.add_argument("--method", choices=(*_METHODS, "none"), default="network",
                   help="default fusion method (default: network; each described in 'medfuse fuse --help'); none: "
                        "registration only, no fusion (any number of moving images; writes what --keep-registered "
                        "writes: the nnU-Net/MONAI preprocessing recipe)")
    _add_suv_option(p, "SUVbw, as fuse")
    p.add_argument("--fallback", choices=_METHODS[1:], default=None,
                   help="classical method to use if the network cannot run (default: fail the subject)")
    _add_device_option(p)
    p.add_argument("--report", metavar="PATH", default=None,
                   help="report file (.csv or .json; default beside the manifest: study.csv -> study-report.csv, "
                        "study.yaml -> study.yaml-report.csv; dataset folder: batch-report.csv in --out)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo subjects whose outputs exist but are not verified by their sidecar")
    p.add_argument("--keep-registered", action="store_true",
                   help="also write each moving image on the fixed grid in its own unit (a PET in SUV, float32) "
                        "as SUBJECT_pet_registered.nii.gz and its transform as SUBJECT_pet.tfm (ITK, as medfuse "
                        "register writes it; none without registration), the fixed image re-saved as "
                        "SUBJECT_mr_fixed.nii.gz, and label maps (seg, mask, label, roi files; a manifest's labels "
                        "column) on a moving image's grid moved by nearest neighbour as "
                        "SUBJECT_<label>_registered.nii.gz, beside the fused output")
    p.set_defaults(func=_cmd_batch)

    p = add("demo", "fuse the bundled sample MR + PET end to end",
            "Load the sample volumes (MR T1 NIfTI or CT DICOM, FDG PET DICOM with SUV), register the PET\n"
            "onto the MR/CT (rigid), fuse, and write into DIR: fused.nii.gz, fused.json (provenance),\n"
            "fused.png (three orthogonal slices through the lesion) and pet_to_mr.tfm (pet_to_ct.tfm).\n"
            "Run again, it rewrites its own files in DIR; it refuses a folder where files of those names\n"
            "were not written by the demo.\n"
            "If the fusion network cannot run (torch not installed, or its weights absent) it falls back to the "
            "Laplacian pyramid and says so.\n\n"
            "example:\n  medfuse demo --out demo_output")
    p.add_argument("--out", default="demo_output", metavar="DIR", help="output folder (default: demo_output)")
    p.add_argument("--method", choices=_METHODS, default="network", help="fusion method (default: network)")
    _add_device_option(p)
    p.add_argument("--anatomy", choices=("mr", "ct"), default="mr",
                   help="the anatomical image to fuse the PET with: the MR T1 (default) or the CT DICOM series")
    p.add_argument("--samples", metavar="DIR", default=None,
                   help="sample volumes folder (default: the bundled sample_volumes, generated if absent)")
    p.set_defaults(func=_cmd_demo)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


_ESCAPE_ERRORS = "medfuse.escape"


def _escape_or_pass_through(err: UnicodeError) -> Tuple[str, int]:
    """Codec error handler: a file name's undecodable bytes (surrogates) go out as those bytes, as ``ls`` shows
    them; a character the output's encoding lacks goes out as a ``\\u0141``-style escape."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    bad = err.object[err.start:err.end]
    if all("\udc80" <= c <= "\udcff" for c in bad):
        return codecs_surrogateescape(err)
    return _escape_all(err)


_ESCAPE_ALL_ERRORS = "medfuse.escape-all"


def _escape_all(err: UnicodeError) -> Tuple[str, int]:
    """Codec error handler for messages (stderr): a file name's undecodable byte as ``\\xe9``, as errors quote it
    everywhere (:func:`medfuse.io._atomic._shown`), not Python's ``\\udce9``; another character the encoding lacks
    as a ``\\u0141``-style escape."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    bad = err.object[err.start:err.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else f"\\x{ord(c):02x}"
                   if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
                   for c in bad), err.end


def codecs_surrogateescape(err: UnicodeEncodeError) -> Tuple[str, int]:
    import codecs

    return codecs.lookup_error("surrogateescape")(err)


def _escape_unprintable_output() -> Callable[[], None]:
    """Make stdout and stderr write characters their encoding lacks as ``\\u0141``-style escapes; returns an undo.

    Why: a Windows console or redirected output (``medfuse info x > list.txt``) uses the ANSI code page (cp1252),
    which lacks e.g. the ``Ł`` of a user's folder ``C:\\Users\\Łukasz``; printing such a path raised
    UnicodeEncodeError, so ``medfuse fuse`` wrote its output and then exited 3 as if it had a bug. A UTF-8 output
    (Linux, macOS) is unchanged.
    """
    import codecs

    codecs.register_error(_ESCAPE_ERRORS, _escape_or_pass_through)
    codecs.register_error(_ESCAPE_ALL_ERRORS, _escape_all)
    changed = []
    for stream in (sys.stdout, sys.stderr):
        # surrogateescape: Python's choice for a C/POSIX locale without UTF-8 mode (an 'é' in a summary table
        # was an internal error there, after the whole batch had run).
        before = getattr(stream, "errors", None)
        # stderr's backslashreplace showed a name's byte as \udce9, where messages quote it as \xe9.
        handler = _ESCAPE_ALL_ERRORS if before == "backslashreplace" else _ESCAPE_ERRORS
        if before in ("strict", "surrogateescape", "backslashreplace") and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors=handler)
                changed.append((stream, before))
            except (OSError, ValueError, LookupError):  # a closed or unusual stream: leave it as it is
                pass

    def undo() -> None:
        for stream, before in changed:
            try:
                stream.reconfigure(errors=before)
            except (OSError, ValueError):
                pass

    return undo


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``medfuse`` command. Returns the exit code (see ``medfuse --help``)."""
    undo = _escape_unprintable_output()
    closed = _stand_in_for_closed_streams()
    _CONSOLE[0] = argv is None
    real_stdout = sys.stdout
    sys.stdout = _WatchedStdout(real_stdout, console=argv is None)
    try:
        # SIGTERM before a command's own cancel handler is in place (while it loads its inputs) is a Ctrl-C too.
        with _TermAsInterrupt():
            code = _main(argv)
        if argv is None:  # the console script: the process ends next (a caller of main([...]) keeps its handlers)
            _exit_on_late_signals(code)
        return code
    finally:
        if isinstance(sys.stdout, _WatchedStdout):  # a command may have replaced it: left as it is then
            sys.stdout = real_stdout
        undo()
        closed()


def _stand_in_for_closed_streams() -> Callable[[], None]:
    """Give a stream the shell closed (``medfuse fuse ... >&-``: Python's sys.stdout is then None) a stand-in
    that discards what is written; returns an undo.

    Why: the command's first print failed with AttributeError: 'internal error' (exit 3, and 1 from the flush at
    exit) after the outputs were written, or before any work when stderr was closed (the progress bar).
    """
    replaced = []
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))
            replaced.append(name)

    def undo() -> None:
        for name in replaced:
            stream, _ = getattr(sys, name), setattr(sys, name, None)
            stream.close()

    return undo


class _WatchedStdout:
    """sys.stdout as it was, noting whether a write to it failed (the OSError itself goes on unchanged).

    Why: ``medfuse info x > /dev/full`` said "the disk is full. Fix: free some space", which sent the user to the
    output disk; the command-line handler now tells a failed print from a failed output file by this flag.
    """

    def __init__(self, stream: Any, *, console: bool = False):
        self._stream = stream
        self.failed = False
        self.console = console  # the process is the medfuse command: its standard output may be closed off

    def write(self, text: str) -> int:
        try:
            # Header text (series descriptions, names) reaches the terminal through prints: no escape sequences.
            self._stream.write(_printable(text) if isinstance(text, str) else text)
            return len(text)
        except BrokenPipeError:
            if self._reader_left():
                return len(text)
            raise
        except OSError:
            self.failed = True
            raise

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            if not self._reader_left():
                raise
        except OSError:
            self.failed = True
            raise

    def _reader_left(self) -> bool:
        """The medfuse command's reader left (``medfuse train ... | head -3``): what it prints from now on goes to
        /dev/null and the command goes on. Why: the BrokenPipeError ended it, exit 0 and not a word, so a
        training stopped after its third line without a checkpoint. Not for main([...]) in a program."""
        if not self.console:
            return False
        _stdout_to_devnull()
        try:
            self._stream.flush()  # what was buffered for the reader goes to /dev/null now
        except (OSError, ValueError):
            pass
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _stdout_failed() -> bool:
    """After an OSError: was it standard output that failed? Then nothing more goes there (the flush at exit
    would fail again)."""
    if not getattr(sys.stdout, "failed", False):
        return False
    if getattr(sys.stdout, "console", False):  # not a script's or notebook's stdout, which main([...]) shares
        _stdout_to_devnull()
    return True


def _stdout_to_devnull() -> None:
    """Point standard output's file descriptor at /dev/null: what is still buffered for it cannot fail the flush
    at exit again (a reader that left, a full device)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _exit_on_late_signals(code: int) -> None:
    """Make a Ctrl-C or SIGTERM that comes while Python shuts down, after the command ended, exit 130 with a line.

    Why: the teardown (torch, tqdm, Dask) takes up to about 0.7 s; a SIGTERM there ended the process with -15 and
    no word (a scheduler's time limit looked like a crash), a Ctrl-C with -2, 0 or a traceback from an atexit
    callback, where the help promises 130 whenever it comes. What the command wrote is complete by then.
    """
    def late(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()  # os._exit skips it: a piped stdout would lose its last lines
            except Exception:  # noqa: BLE001 - closed, or a write the signal interrupted (reentrant call)
                pass
        os.write(2, f"medfuse: interrupted while exiting, after the command had ended (exit code {code}); what it "
                    "wrote is complete\n".encode())
        os._exit(EXIT_CANCELLED)

    for sig in [getattr(signal, n, None) for n in ("SIGINT", "SIGTERM")] + list(_warning_signals()):
        if sig is None:
            continue
        try:
            signal.signal(sig, late)
        except ValueError:  # not the main thread
            return
    for stream in (sys.stdout, sys.stderr):  # the last lines out now, not at interpreter exit
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _main(argv: Optional[Sequence[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _Parser.given = argv
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            # What argparse would refuse, with the command's own help as the fix (it pointed at 'medfuse --help',
            # which does not say that register takes exactly FIXED and MOVING).
            command = getattr(args, "command", None)
            _Parser(prog=f"medfuse {command}" if command else "medfuse").error(
                "unrecognized arguments: " + " ".join(extra))
    except SystemExit as e:  # argparse already printed usage and the error (or the help)
        return EXIT_OK if e.code in (0, None) else EXIT_USAGE
    if not getattr(args, "command", None):
        # Short, on stderr: the whole help (47 lines) on stdout, for a mistake, scrolled the point away.
        commands = ", ".join(next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)))
        print(f"{parser.format_usage().rstrip()}\nmedfuse: error: no command given. Fix: give one of {commands} "
              "(run 'medfuse --help' for what each does, 'medfuse demo' to try it on the bundled samples).",
              file=sys.stderr)
        return EXIT_USAGE
    args.debug = bool(getattr(args, "debug", False))
    args.quiet = bool(getattr(args, "quiet", False))
    _expand_home(args)
    try:
        if getattr(args, "output", None) == "-":
            # The shell convention for standard output: it became a DICOM folder named "-" (no dot ending).
            raise InvalidInputError("'-o -' (standard output) is not supported: medfuse writes image files and "
                                    "their provenance sidecars", fix="give an output file name, e.g. -o fused.nii.gz")
        from .io import four_d_choice

        with four_d_choice(getattr(args, "volume", None)):  # --volume, for every input a command loads
            return int(args.func(args))
    except (CancelledError, KeyboardInterrupt) as e:
        _print_cancelled(args, e)
        return EXIT_CANCELLED
    except MedfuseError as e:
        if args.debug:
            _print_traceback(args)
        e = _cli_error(e, _series_by_input(args))  # every command's fixes in command-line words (register too)
        print(f"medfuse {args.command}: error: {_scrubbed(e.one_line(), args)}", file=sys.stderr)
        _json_error(args, e.one_line())
        return EXIT_USAGE
    except BrokenPipeError:  # the reader left (medfuse info x | head -1): nothing more to say
        _stdout_to_devnull()
        return EXIT_OK
    except OSError as e:  # from a step that did not type it: permission, disk full... is not a bug
        if e.filename is None and _stdout_failed():
            # "the disk is full. Fix: free some space" for `> /dev/full` sent the user to the output disk.
            print(f"medfuse {args.command}: error: standard output could not be written ({e.strerror or e}): what "
                  "the command printed was lost. Fix: send its output somewhere that takes it (a file on a disk "
                  "with space), or run with -q", file=sys.stderr)
            return EXIT_USAGE
        message = _os_error_message(e)
        if message is None:
            return _internal_error(args, e)
        if args.debug:
            _print_traceback(args)
        print(f"medfuse {args.command}: error: {_scrubbed(message, args)}", file=sys.stderr)
        _json_error(args, message)
        return EXIT_USAGE
    except ModuleNotFoundError as e:  # a required package gone (a broken install, or one without dependencies)
        if args.debug:
            _print_traceback(args)
        print(f"medfuse {args.command}: error: the package '{e.name or e}' that medfuse needs is not installed. Fix: "
              "install medfuse again with its dependencies (pip install medfuse, plus the extras you use, e.g. "
              "'medfuse[ml]')", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - a bug: one line unless --debug
        return _internal_error(args, e)


def _json_error(args: argparse.Namespace, text: str) -> None:
    """``--json`` (but info's, which says its errors itself): standard output holds one JSON object when the
    command fails too, ``{"command": ..., "error": ...}``, as info's does; the error is said on stderr as well."""
    if getattr(args, "json", False) and args.command != "info":
        with contextlib.suppress(OSError):
            print(json.dumps({"command": args.command, "error": _scrubbed(text, args)}, indent=2))


#: Control characters (C0 but tab, newline and carriage return; DEL; C1) as visible escapes.
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]
                    if chr(c) not in "\t\n\r"}


def _printable(text: str) -> str:
    """``text`` with control characters shown as ``\\x1b``-style escapes.

    Why: header text echoed to a terminal (a SeriesDescription of ``ESC[2J ESC[31m``, from a tampered export)
    cleared the screen and recoloured the output; other sequences set a window title or the clipboard.
    """
    return text.translate(_CONTROL_ESCAPES)


def _scrubbed(message: str, args: argparse.Namespace) -> str:
    """``message`` with the patient identifiers of the command's DICOM inputs blanked (and control characters
    escaped, :func:`_printable`).

    Why: an error quotes the path it is about, and a DICOM folder is often named after the patient
    (``pat/DOE^JOHN/pet: series 7 asked for ...``); batch reports and sidecars blanked such paths, the terminal
    did not. The DICOM headers of every path-like argument that exists are read (:func:`_identifiers`, once per
    command); nothing else is.
    """
    try:
        from .provenance import scrub

        ids = _identifiers(args)
        return _printable(scrub(message, ids) if ids else message)
    except Exception:  # noqa: BLE001 - the error itself must still be said
        return _printable(message)


# The arguments naming inputs, whose DICOM headers hold the identifiers to blank (``rest``: evaluate's and
# train's own options, passed on to them).
_INPUT_ARGS = frozenset({"fixed", "moving", "reference", "manifest", "path", "initial_transform", "samples", "rest",
                         "image", "mask"})
_OUTPUT_OPTIONS = frozenset({"-o", "--out", "--output", "--run-dir", "--report"})


def _identifiers(args: argparse.Namespace) -> List[str]:
    """The patient identifiers of the command's inputs (read once per command: every message is blanked)."""
    cached = getattr(args, "_patient_identifiers", None)
    if cached is not None:
        return cached
    from .provenance import patient_identifiers

    paths: List[Any] = []
    for name, value in vars(args).items():
        # Inputs only: an output path is not read for identifiers (``-o /`` walked the whole file system, and
        # blocked reading a pipe under /proc, before its one-line error could be printed).
        if name not in _INPUT_ARGS:
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if name == "rest":  # a delegated command's own options: the value after an output option is an output
            values = [v for i, v in enumerate(values) if i == 0 or values[i - 1] not in _OUTPUT_OPTIONS]
        for v in values:
            if isinstance(v, (str, os.PathLike)) and str(v).strip() and not str(v).startswith("-"):
                paths.append(v)
    ids = patient_identifiers([p for p in paths if os.path.lexists(p)])
    args._patient_identifiers = ids
    return ids


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says the machine ran out of memory (NumPy's MemoryError, torch's allocator)."""
    text = str(e)
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()))


def _internal_error(args: argparse.Namespace, e: BaseException) -> int:
    """A bug: one line (the full traceback with --debug) and exit 3. Called while handling ``e``.

    Running out of memory is no bug (it said "internal error ... report the traceback"): exit 2, with what to do.
    """
    if args.debug:
        _print_traceback(args)
    if _out_of_memory(e):
        print(f"medfuse {args.command}: error: not enough memory for this command ({e.__class__.__name__}); "
              "nothing was written. Fix: close other programs, fuse smaller volumes (cropped, or on a coarser grid), "
              "or use a rule that needs less: mean and max least, then laplacian and wavelet, gff most "
              "(docs/fusion.md, 'Memory')", file=sys.stderr)
        return EXIT_USAGE
    # Blanked before it is cut: a cut could leave half a name that no longer matches.
    text = _scrubbed(" ".join(str(e).split()), args)[:300]
    print(f"medfuse {args.command}: internal error: {e.__class__.__name__}: {text}. "
          f"Fix: rerun with --debug and report the traceback.", file=sys.stderr)
    return EXIT_INTERNAL


def _print_traceback(args: argparse.Namespace) -> None:
    """The traceback of the exception being handled (--debug), blanked like every other message: the exception
    text quotes the folders it is about, often named after the patient. Called while handling it."""
    print(_scrubbed(traceback.format_exc(), args), end="", file=sys.stderr)


def _print_cancelled(args: argparse.Namespace, error: Optional[BaseException] = None) -> None:
    """Say that the command was cancelled and which outputs it kept, their paths blanked like every message."""
    try:
        text = _scrubbed(_cancelled_message(args, error), args)
    except KeyboardInterrupt:  # a second Ctrl-C while the inputs' headers are read: say it without the paths
        text = f"medfuse {args.command}: cancelled"
    print(text, file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
