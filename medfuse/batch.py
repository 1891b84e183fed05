"""Batch fusion over many subjects on Dask: ``medfuse batch MANIFEST``.

* ``run_batch`` takes a manifest, or a dataset folder holding one folder per subject whose images
  are found by :func:`discover_subject` (names, DICOM Modality); unpaired or ambiguous subjects fail alone.
* The manifest is a CSV (header ``subject,fixed,moving,output`` plus optional ``register``, ``method``,
  ``series`` and ``modalities``; several moving images separated by ``;`` or in extra ``moving*`` columns; a
  ``.tsv``, or a spreadsheet's CSV with ``;`` between cells, is read too) or a YAML list of such mappings (or
  ``{defaults: {...}, subjects: [...]}``). Relative paths are relative to the manifest's folder.
* Subjects run in parallel on a local Dask cluster of worker *processes* by default, or on an
  existing cluster (``scheduler="tcp://host:8786"``).
* Re-runs are idempotent: a subject is skipped when its output's hash, its inputs' hashes and
  the pipeline parameters all match its provenance sidecar; a medfuse output the sidecar shows stale
  is redone, anything else at an output path is left alone unless ``overwrite``.
* The report is written atomically before any work, every few seconds while subjects end, and at the end; an
  earlier report's other rows are kept. One run per report at a time (an OS lock on ``.<report>.lock``, released
  however the run ends).
* A failing subject is caught in its worker and reported; it never stops the others.
* Outputs are written atomically (temporary file, sidecar, rename), so an interrupted run leaves
  no half-written output.
* Each worker's ITK, torch and BLAS/OpenMP threads are capped (default 1) so N workers use N cores.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import os
import signal
import sys
import threading
import time
import unicodedata
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from ._checks import MAX_THREADS, as_path, choice, cwd_gone, describe, is_or_above, label, whole
from ._runlock import run_lock
from .io._atomic import case_key
from .errors import (InvalidInputError, MedfuseError, MedfuseWarning, MissingDependencyError, OutputExistsError,
                     OutputWriteError, UnreadableFileError)
from .progress import CancelToken, check_callbacks

__all__ = ["Subject", "SubjectResult", "BatchSummary", "read_manifest", "run_batch", "run_subject", "write_phantom_subjects",
           "cap_threads", "THREAD_ENV_VARS", "discover", "discover_subject", "write_manifest"]

PathLike = Union[str, os.PathLike]

#: Environment variables that bound the thread pools of OpenMP, BLAS libraries, ITK and torch.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                   "NUMEXPR_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
_KINDS = (None, "rigid", "affine", "deformable")


def _optional_path(value: Any, what: str, fix: str) -> Optional[Path]:
    """``value`` as a Path (:func:`as_path`, with ``fix`` for every wrong value), or ``None`` when not given (``""``
    meant "the default" before)."""
    if value is None or (isinstance(value, str) and value == ""):
        return None
    return as_path(value, what=what, fix=fix, images=False)


def _folder_arg(value: Any, what: str, fix: str) -> Path:
    """``value`` as the Path of an existing folder, or a typed error (``os.scandir`` raised a bare
    NotADirectoryError for a file, FileNotFoundError for a typo).

    Raises:
        InvalidInputError: not a str or pathlib.Path, or an empty string.
        UnreadableFileError: nothing is there, or it is a file.
    """
    p = as_path(value, what=what, fix=fix, images=False)
    if not p.exists():
        raise UnreadableFileError(f"the {what} does not exist", fix="check the path", path=p)
    if not p.is_dir():
        raise UnreadableFileError(f"the {what} is a file; a folder is needed here", fix=fix, path=p)
    return p


@dataclass
class Subject:
    """One manifest row (or one subject folder of a dataset), with absolute paths.

    Attributes:
        subject: the subject's name (once per batch; the report's first column).
        fixed: the reference image (file or DICOM folder); ``""`` for a dataset's subject, whose images are found
            when it runs, or for an unpaired manifest row.
        moving: the moving images (files or DICOM folders).
        output: the fused output's path (once per batch).
        register: this subject's registration kind (``"none"``: no registration, whatever the batch's option);
            ``None``: the batch's ``register`` option.
        method: this subject's fusion method; ``None``: the batch's ``method`` option (default ``"network"``).
        folder: a dataset's subject folder whose images are found on the worker (:func:`discover_subject`)
            when ``fixed`` is empty.
        problem: why this subject cannot run (an unpaired manifest row); it is reported as failed and the
            others go on.
        series: for DICOM folders that hold several series side by side, one choice per input, fixed first
            (a number, a modality or a UID; ``"-"`` for none; see :func:`medfuse.io.select_series`).
        modalities: one modality per input, fixed first (``MR``, ``CT``, ``PT``, ``NM``; ``"-"``: the input's own,
            as its header gives it), as ``fuse_files(modalities=...)`` takes them; ``None``: a manifest row's inputs
            keep their own (a NIfTI file has none: ``unknown``), a dataset's files get the modality their names
            tell (see :func:`_name_modalities`).
        labels: segmentations or label maps on one of the subject's image grids (a manifest's ``labels`` column,
            ``;``-separated; a dataset's files named ``seg``, ``dseg``, ``mask``, ``label(s)`` or ``roi``), never
            fused; with ``keep_registered`` a label on a moving image's grid is moved onto the fixed grid by
            nearest neighbour (:func:`registered_paths`).
    """

    subject: str
    fixed: str
    moving: List[str]
    output: str
    register: Optional[str] = None
    method: Optional[str] = None
    folder: Optional[str] = None
    problem: Optional[str] = None
    series: Optional[List[str]] = None
    modalities: Optional[List[str]] = None
    labels: Optional[List[str]] = None


@dataclass
class SubjectResult:
    """What happened to one subject (one report row; new fields go at the end to keep the column order).

    Attributes:
        subject: the subject's name.
        status: ``done``, ``skipped`` (up to date), ``failed``, ``cancelled`` or ``pending`` (in a report
            written while the run goes on).
        seconds: the time spent on the subject in this run.
        output: the output's path.
        error: why the subject failed or was not run, on one line (patient identifiers blanked).
        method_used: the fusion method that made the output (a fallback's name when the network could not run).
        registration_suspect: True when a registration looked suspect (check that output), False when the
            subject was registered and no registration looked suspect, None when no registration ran (or the
            subject ended before one; a report cell left empty). Before 2026-12 a registration that looked fine
            was None too.
        worker: the process that ran the subject (``"pid N"``).
        inputs: the images fused, fixed first, separated by ``;`` (for a failed subject, those it was given, where
            known).
        finished_utc: when the output was made (for a skipped subject, by the earlier run); for a failed or
            cancelled subject, when it ended.
        medfuse_version: the medfuse version that made it (for a failed or cancelled subject, that ran it).
        note: why an existing output was redone (inputs, parameters, method or weights changed).
        warnings: medfuse's warnings while the subject ran, ``; ``-separated (patient identifiers blanked): on a
            Dask worker they were printed raw in the worker's log, naming patient folders, even with ``-q``.
        registered_outputs: with ``keep_registered``, the moving images kept on the fixed grid and their
            transforms (:func:`registered_paths`), ``;``-separated (a list in a JSON report).
        rotation_deg: the registration's rotation in degrees (the largest of a subject's registrations); None when
            none ran.
        translation_mm: how far the registration moved the fixed image's centre, mm (the largest); None when none
            ran.
        turned_start: the turn of a turned start that won a registration (``"180y"``, ``;``-separated for
            several): a half turn between a subject's images most often means a wrong header (a flipped slice
            order gives a mirror image, which no rotation undoes); False when registered from an unturned start,
            None when no registration ran.
        outputs: the subject's files by role, for a training pipeline to take without parsing names (paths as
            lists and mappings, never ``;``-joined): ``inputs`` (fixed first), ``fused`` (None with method
            ``none``), and with ``keep_registered``: ``fixed`` (the fixed image re-saved on its own grid),
            ``registered`` and ``transforms`` (by the word in their names: ``{"pet": ...}``, ``{"t1c": ...}``) and
            ``labels`` (by their label word, ``{"seg": ...}``, numbered where it repeats: its path on the fixed
            grid, the original where it lies there already). A CSV report holds it as JSON text. None where nothing is known.
    """

    subject: str
    status: str
    seconds: float = 0.0
    output: Optional[str] = None
    error: Optional[str] = None
    method_used: Optional[str] = None
    registration_suspect: Optional[bool] = None
    worker: Optional[str] = None
    inputs: Optional[str] = None
    finished_utc: Optional[str] = None
    medfuse_version: Optional[str] = None
    note: Optional[str] = None
    warnings: Optional[str] = None
    registered_outputs: Optional[str] = None
    rotation_deg: Optional[float] = None
    translation_mm: Optional[float] = None
    turned_start: Union[str, bool, None] = None
    outputs: Optional[Dict[str, Any]] = None


#: The statuses of subjects that ran in this run (their ``seconds`` are this run's work).
_ENDED = ("done", "failed")


@dataclass
class BatchSummary:
    """All subjects' results plus where the report went.

    Attributes:
        results: one :class:`SubjectResult` per subject, in the order given.
        report_path: the report written, or ``None`` when it could not be written (a warning said why).
        wall_seconds: the run's wall-clock time.
        workers: how many workers ran the subjects (1 for ``scheduler="synchronous"``).
        cancelled: the run was cancelled (unfinished subjects are reported as ``cancelled``).
        workers_asked: the local workers asked for, when more than there were subjects (``workers`` is then the
            number of subjects); else None.
        scheduler: the run's scheduler (``"local"``, ``"synchronous"`` or an address); None where not known.
    """

    results: List[SubjectResult]
    report_path: Optional[Path]
    wall_seconds: float
    workers: int
    cancelled: bool = False
    workers_asked: Optional[int] = None
    scheduler: Optional[str] = None

    @property
    def one_process_seconds(self) -> Optional[float]:
        """About how long a local cluster's run would have taken in one process (``scheduler="synchronous"``): its
        subjects' median time times their number, where that is shorter than the run took; else None.

        Why: cheap subjects on as many workers as cores ran twice as slowly as one after the other (the workers'
        start and the scheduler cost more than the work). The median leaves out each worker's first subject, which
        pays for the imports; the subjects' times come out larger as the workers and the driver share the cores,
        so this errs on the side of silence.
        """
        import statistics

        ended = [r.seconds for r in self.results if r.status in _ENDED]
        if self.scheduler != "local" or self.workers < 2 or len(ended) < 2 or self.cancelled:
            return None
        estimate = statistics.median(ended) * len(ended)
        return estimate if estimate < self.wall_seconds else None

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def n_done(self) -> int:
        return self.count("done")

    @property
    def n_skipped(self) -> int:
        return self.count("skipped")

    @property
    def n_failed(self) -> int:
        """The subjects that failed (before 2026-12 the cancelled ones too: "1000 failed, 903 cancelled" for 97)."""
        return self.count("failed")

    @property
    def n_cancelled(self) -> int:
        return self.count("cancelled")

    @property
    def subjects_per_minute(self) -> float:
        return 60.0 * self.n_done / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def reasons(self, status: str = "failed") -> List[Tuple[int, str]]:
        """The reasons of the subjects with ``status``, grouped: ``(count, reason)``, the most frequent first.

        A reason is a row's error without the file it names, its parenthesised details (the files found, say) and
        its fix, so that 1,000 subjects missing their PET make one group: ``unpaired: no PET or SPECT found``.
        """
        groups: Dict[str, int] = {}
        for r in self.results:
            if r.status == status:
                why = _gist(r.error or "") or "no reason given"
                groups[why] = groups.get(why, 0) + 1
        return sorted(((n, why) for why, n in groups.items()), key=lambda g: -g[0])

    def warning_groups(self, first: int = 3) -> List[Tuple[int, str, List[str]]]:
        """The subjects' warnings grouped: ``(count, text, the first subjects)``, the most frequent first.

        A subject's warnings are grouped with another's when they read the same once the subject's name is taken
        out (``*`` in its place) and each is cut as :meth:`reasons` cuts an error; a group of one keeps its
        subject's own text. Why: printed one line per subject, the same warning on 3,000 subjects flooded the
        terminal (the report keeps each subject's own).

        Args:
            first: how many of each group's subjects to name (in the order given).
        """
        import re

        groups: Dict[str, List[SubjectResult]] = {}
        for r in self.results:
            if r.warnings:
                # sub-01 in /d/sub-01/pet.nii.gz or sub-01_fused.nii.gz, never in sub-010
                own = re.sub(rf"(?<![^\W_]){re.escape(r.subject)}(?![^\W_])", "*", r.warnings) if r.subject \
                    else r.warnings
                key = "; ".join(_gist(part) or part for part in own.split("; "))
                groups.setdefault(key, []).append(r)
        ordered = sorted(groups.items(), key=lambda g: -len(g[1]))
        return [(len(rows), key if len(rows) > 1 else rows[0].warnings or key, [r.subject for r in rows[:first]])
                for key, rows in ordered]

    def warning_lines(self, first: int = 3) -> List[str]:
        """One line per group of :meth:`warning_groups`: ``sub-01: TEXT`` for a subject of its own, else
        ``1200 subjects (sub-01, sub-02, sub-03, ...): TEXT``, the most frequent first."""
        lines = []
        for n, text, named in self.warning_groups(first):
            who = named[0] if n == 1 else f"{n} subjects ({', '.join(named)}{', ...' if n > len(named) else ''})"
            lines.append(f"{who}: {text}")
        return lines

    def table(self, max_rows: Optional[int] = 50) -> str:
        """A plain-text summary table, one row per subject, failures with their one-line reason, then the counts,
        a hint where one process would have been faster (:attr:`one_process_seconds`), and the failures grouped
        by reason.

        Args:
            max_rows: at most this many subject rows (failed, cancelled and suspect ones first, else in order; a
                line says how many more the report holds); ``None``: every subject. A run of 1,000 subjects printed
                1,003 lines, where the counts by reason say what went wrong.
        """
        w = max([7] + [len(r.subject) for r in self.results])
        lines = [f"{'subject':<{w}}  {'status':<9} {'seconds':>8}  output / error"]
        shown = list(self.results)
        if max_rows is not None and len(shown) > max_rows:
            first = [id(r) for r in shown if r.status in ("failed", "cancelled") or r.registration_suspect
                     or r.turned_start]
            top = set(first)
            rest = [id(r) for r in shown if id(r) not in top]
            picked = set((first + rest)[:max(0, max_rows)])
            shown = [r for r in shown if id(r) in picked]
        for r in shown:
            status = r.status.upper() if r.status in ("failed", "cancelled") else r.status
            detail = r.error if r.error else (r.output or "")
            if r.registration_suspect:
                detail += "  (registration suspect: check it)"
            if r.turned_start:
                detail += (f"  (registered from a start turned {r.turned_start}: check both images' headers; a "
                           "flipped slice order gives a mirror image no rotation undoes)")
            if r.note:  # why an existing output was redone
                detail += f"  ({r.note})"
            lines.append(f"{r.subject:<{w}}  {status:<9} {r.seconds:>8.1f}  {detail}")
        if len(shown) < len(self.results):
            lines.append(f"... {len(self.results) - len(shown)} more subjects not shown"
                         + (f": every subject is in the report, {self.report_path}" if self.report_path else ""))
        lines.append(f"{len(self.results)} subjects: {self.n_done} done, {self.n_skipped} skipped (up to date), "
                     f"{self.n_failed} failed" + (f", {self.n_cancelled} cancelled" if self.n_cancelled else "")
                     + f"; {self.wall_seconds:.1f} s on {self.workers} worker(s)"
                     # "--workers 2" and "on 1 worker(s)" read as a bug without the reason
                     + (f" ({self.workers_asked} asked; never more workers than subjects)"
                        if self.workers_asked and self.workers_asked > self.workers else ""))
        alone = self.one_process_seconds
        if alone is not None:
            lines.append(f"one process would have taken about {alone:.1f} s (the subjects' median time x their "
                         "number): for subjects this quick, --scheduler synchronous (no cluster to start) is faster")
        groups = self.reasons()
        if groups:
            lines.append(f"{self.n_failed} failed: " + "; ".join(f"{n} x {why}" for n, why in groups[:10])
                         + (f"; {len(groups) - 10} other reasons" if len(groups) > 10 else ""))
        return "\n".join(lines)


def _gist(text: str) -> str:
    """An error or warning without the file it starts with, its parenthesised details and its fix: what a
    summary groups subjects by (:meth:`BatchSummary.reasons`, :meth:`BatchSummary.warning_groups`); ``""`` for
    nothing left."""
    import re

    gist = text.split(" Fix: ", 1)[0]
    # The file concerned: absolute, or relative as a list manifest gives it (data/sub-04/pet.nii: ...).
    gist = re.sub(r"^(?:/|~|[A-Za-z]:[\\/]|\\\\|[^\s:/\\]+[/\\])[^:]*: ", "", gist)
    while True:  # innermost parentheses first: "(most often out of memory (OOM))" goes whole
        shorter = re.sub(r"\s*\([^()]*\)", "", gist)
        if shorter == gist:
            return gist.strip().rstrip(".")
        gist = shorter


# ----------------------------------------------------------------------------- manifest
#: What a manifest row (or a YAML manifest's ``defaults``) may hold besides its ``moving*`` columns.
_MANIFEST_KEYS = ("subject", "fixed", "output", "register", "method", "series", "modalities", "labels", "note")


def _display_path(value: Any) -> str:
    """``value`` as a message quotes it: absolute, without the ``..``, ``.`` and ``//`` that made
    ``/d/out/../out/x.nii.gz`` hard to recognise as ``/d/out/x.nii.gz``.

    Symbolic links are not followed (that would show folders the user never named), unless a link before a ``..``
    makes the short form name another file than the one meant: then the path with its links followed.
    """
    raw = os.path.expanduser(os.fspath(value) if isinstance(value, os.PathLike) else str(value))
    short = os.path.abspath(raw)  # normalised by the letters
    real = os.path.realpath(raw)
    return short if os.path.realpath(short) == real else real


def _manifest_text(path: Any) -> str:
    """A path as a manifest (UTF-8 text) spells it: the UTF-8 its bytes on disk are, which :func:`_on_disk` maps
    back in any locale (a latin-1 process's own spelling, 'Ã©', named another file when read again).

    Raises:
        InvalidInputError: the name's bytes are not UTF-8 text, which a manifest cannot hold (it was written, then
            refused on reading as "not UTF-8").
    """
    text = os.fspath(path)
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeDecodeError:
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        raise InvalidInputError(f"{shown}: the name holds bytes that are not UTF-8 text, which a manifest (UTF-8) "
                                "cannot hold", fix="rename it, or run the dataset folder itself (medfuse batch "
                                "DATASET), which takes such names") from None


def _on_disk(text: str) -> str:
    """A manifest's path (UTF-8 text) as this process names the file: the same in a UTF-8 locale; in a latin-1 or
    an ASCII (C, without UTF-8 mode) one, the str whose bytes on disk are the UTF-8 the manifest spelt.

    Why: under LC_ALL=de_DE.ISO-8859-1 a row's ``Sujet_é/mr.nii.gz`` was "no such file" beside the folder ``ls``
    showed, and under LC_ALL=C (PYTHONUTF8=0) it stopped the run with an internal error (UnicodeEncodeError).
    """
    try:
        return os.fsdecode(text.encode("utf-8", "surrogateescape"))
    except (UnicodeError, ValueError):  # lone surrogates of another origin: left as they are
        return text


def _row_error(path: Path, row: int, problem: str, fix: str) -> InvalidInputError:
    return InvalidInputError(f"manifest row {row}: {problem}", fix=fix, path=path)


def _formula_like(text: str) -> bool:
    """Whether a spreadsheet would take ``text`` as a formula: it starts with =, +, @, a tab or carriage return, or
    with - unless it is a plain number ("-01").

    Why: the batch report and a written manifest repeat subject ids, and a subject (or dataset folder) named
    ``=HYPERLINK("http://...?d="&B2)`` ran as a formula in Excel when the report was opened (CSV injection).
    """
    import re

    t = text.lstrip(" ")
    return bool(t) and (t[0] in "=+@\t\r" or (t[0] == "-" and not re.fullmatch(r"-\d+(\.\d+)?", t.strip())))


def _check_columns(keys: Sequence[str], where: str, path: Path) -> None:
    """Refuse column names a manifest does not know.

    Why: a misspelt column ("methd", "regster") was ignored, so the subject ran with the defaults unsaid.

    Args:
        keys: the column names (lower case).
        where: what holds them, as the message names it (``the header (row 1)``, ``manifest row 3``).
        path: the manifest.

    Raises:
        InvalidInputError: a name that is no column.
    """
    unknown = sorted(k for k in keys if k not in _MANIFEST_KEYS and not k.startswith("moving"))
    if unknown:
        import difflib

        hints = [f"{label(k)} (did you mean '{close[0]}'?)" if close else label(k)
                 for k in unknown for close in [difflib.get_close_matches(k, _MANIFEST_KEYS, n=1, cutoff=0.6)]]
        has = "has" if where.startswith("the header") else "holds"
        raise InvalidInputError(f"{where} {has} unknown column(s) {', '.join(hints)}",
                                fix=f"rename or remove them; a manifest's columns are "
                                    f"{', '.join(_MANIFEST_KEYS[:3])}, moving (moving2, ...), "
                                    f"{', '.join(_MANIFEST_KEYS[3:])}", path=path)


def _subject_from(raw: Mapping[str, Any], *, base: Path, path: Path, row: int,
                  defaults: Mapping[str, Any]) -> Subject:
    d = {**defaults, **{str(k).strip().lower(): v for k, v in raw.items() if k is not None}}
    _check_columns(list(d), f"manifest row {row}", path)
    for key in ("subject", "output", "fixed"):
        if isinstance(d.get(key), (list, tuple, Mapping)):  # str() of a YAML list made "['a', 'b']" the value
            raise _row_error(path, row, f"'{key}' holds a {'list' if isinstance(d[key], (list, tuple)) else 'mapping'}",
                             f"give one {key} per row, as text")
    nul = sorted(k for k, v in d.items() if isinstance(v, str) and "\0" in v)
    if nul:  # every file call on it raised a bare ValueError ("internal error", and exit 0)
        raise _row_error(path, row, f"{', '.join(repr(k) for k in nul)} holds a null character (\\0)",
                         "save the manifest as plain text (a spreadsheet exported in another encoding leaves them)")
    for key in ("subject", "output"):  # without these the row is no subject at all
        if not d.get(key) or not str(d[key]).strip():
            raise _row_error(path, row, f"'{key}' is missing or empty",
                             "give every row subject, fixed, moving and output")
    if _formula_like(str(d["subject"])):
        raise _row_error(path, row, "the subject id starts like a spreadsheet formula (=, +, -, @)",
                         "rename the subject: the report repeats it, and a spreadsheet opening the report would "
                         "run it as a formula")
    moving: List[str] = []
    for key in sorted((k for k in d if k.startswith("moving")), key=lambda k: (k != "moving", k)):
        v = d[key]
        if v is None or v == "":
            continue
        # Unstripped: absolute() decides (a name may end in a space).
        if isinstance(v, (list, tuple)):
            moving += [str(x) for x in v if str(x).strip()]
        else:
            moving += _cell_paths(str(v), base)
    # An unpaired subject (no PET found, say) fails alone when the batch runs; the others go on.
    problem = None
    # A note (write_manifest's: why discovery left the cells empty) is for the reader; the run only repeats it.
    note = str(d.get("note") or "").strip()
    why = f" ({note})" if note else ""
    if not d.get("fixed") or not str(d["fixed"]).strip():
        problem = f"manifest row {row}: unpaired: 'fixed' is empty{why}. Fix: name the subject's reference image, " \
                  "or drop the row."
    elif not moving:
        problem = f"manifest row {row}: unpaired: 'moving' is empty{why}. Fix: name at least one moving image, " \
                  "or drop the row."

    def joined(p: str) -> str:
        q = Path(os.path.expanduser(_on_disk(p)))
        return os.fspath(q if q.is_absolute() else base / q)

    def absolute(p: str) -> str:
        # Spaces around a cell are a spreadsheet's, and go; but a file whose name has them is that file. Stripped
        # always, "scan.nii.gz " (sub-01) was read as "scan.nii.gz" (sub-02's), silently.
        exact, stripped = joined(str(p)), joined(str(p).strip())
        if exact == stripped or not os.path.lexists(exact):
            return stripped
        if os.path.lexists(stripped):
            raise _row_error(path, row, f"{label(str(p))} names two files: one with the spaces around it and one "
                             "without", "rename one of them (a spreadsheet cell's spaces are taken as the name's "
                             "only when no file without them exists)")
        return exact

    reg = d.get("register")
    # "none" in a row is kept as said: it is not the batch's --register (a row registered already, or written by
    # write_manifest(register="none"), was registered anyway under --register rigid).
    reg = None if reg is None or not str(reg).strip() else str(reg).strip().lower()
    if reg not in _KINDS and reg != "none":
        raise _row_error(path, row, f"unknown register value {label(reg)}", "use none, rigid, affine or deformable")
    method = d.get("method")
    method = None if method in (None, "") else str(method).strip().lower()
    if method is not None:
        from .fusion import available_methods

        if method not in (*available_methods(), "none"):  # a typo failed on the worker, after registration
            raise _row_error(path, row, f"unknown method {label(method)}",
                             f"use one of {', '.join(available_methods())} (none: registration only), or leave the "
                             "cell empty for --method")
    fixed = absolute(d["fixed"]) if d.get("fixed") and str(d["fixed"]).strip() else ""
    series = d.get("series")
    if isinstance(series, (list, tuple)):
        series = [str(x).strip() or "-" for x in series]
    elif series is not None and str(series).strip():
        series = [x.strip() or "-" for x in str(series).split(";")]
    else:
        series = None
    if series is not None and problem is None and len(series) != 1 + len(moving):
        raise _row_error(path, row, f"'series' gives {len(series)} choices for {1 + len(moving)} images",
                         "give one per image, fixed first, separated by ';' ('-' for an image that needs none), "
                         "e.g. CT;PT")
    modalities = _row_modalities(d.get("modalities"), None if problem else 1 + len(moving), path, row)
    labels = d.get("labels")
    labels = ([str(x) for x in labels if str(x).strip()] if isinstance(labels, (list, tuple)) else
              _cell_paths(str(labels), base) if labels is not None else [])
    return Subject(subject=str(d["subject"]).strip(), fixed=fixed, moving=[absolute(m) for m in moving],
                   output=absolute(d["output"]), register=reg, method=method, problem=problem, series=series,
                   modalities=modalities, labels=[absolute(x) for x in labels] or None)


def _cell_paths(cell: str, base: Path) -> List[str]:
    """A manifest cell's paths, separated by ``;``, where pieces joined again with ``;`` that name an existing
    file or folder are that one path (``spect;1.nii.gz`` was split, and the error named ``spect``)."""
    def exists(text: str) -> bool:
        q = Path(os.path.expanduser(_on_disk(text.strip())))
        return bool(text.strip()) and os.path.lexists(q if q.is_absolute() else base / q)

    pieces, paths, i = cell.split(";"), [], 0
    while i < len(pieces):
        j = next((j for j in range(len(pieces), i + 1, -1) if exists(";".join(pieces[i:j]))), i + 1)
        paths.append(";".join(pieces[i:j]))
        i = j
    return [x for x in paths if x.strip()]


def _row_modalities(value: Any, n_images: Optional[int], path: Path, row: int) -> Optional[List[str]]:
    """A row's ``modalities`` cell as medfuse's codes, one per image, fixed first (``"-"``: the image's own).

    Why: a dataset's NIfTI PET, with no modality in its header, was fused as ``unknown`` (the network's PET rule
    never ran: up to 0.548 from ``medfuse fuse --modalities MR PT``), and a manifest could not say what it was.
    The values are those ``--modalities`` takes (MR, CT, PT, NM; PET, SPECT), separated by spaces or ``;``.

    Args:
        value: the cell (text, or a YAML list); None or empty: no choice.
        n_images: how many images the row names (None: an unpaired row, not counted).
        path, row: the manifest and the row's number (named in the errors).

    Raises:
        InvalidInputError: a value that is no known modality, or not one per image.
    """
    from .volume import normalise_modality

    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    words = ([str(x).strip() for x in value] if isinstance(value, (list, tuple))
             else str(value).replace(";", " ").split())
    fix = "give one per image, fixed first, separated by spaces or ';' ('-' keeps an image's own), e.g. MR PT"
    if n_images is not None and len(words) != n_images:
        raise _row_error(path, row, f"'modalities' names {len(words)} modalities for {n_images} images", fix)
    codes = []
    for i, w in enumerate(words, start=1):
        if w in ("-", ""):
            codes.append("-")
            continue
        try:
            codes.append(normalise_modality(w))
        except InvalidInputError as e:  # the value is quoted by label(): a pasted path is not shown
            raise _row_error(path, row, f"'modalities': unknown modality {label(w)} for image {i}", e.fix) from None
    return codes


def _text_loader():
    """A ``yaml.SafeLoader`` that keeps every plain scalar as the text written (``null``/``~`` stay None).

    Why: a manifest holds names and paths, and YAML 1.1 typed them: subject ``007`` became ``'7'``, ``010``
    ``'8'`` (octal), ``0x1F`` ``'31'``, ``yes`` ``'True'``, ``1_000`` ``'1000'``, ``12:30`` ``'750'``, while the
    same cells of a CSV stayed as written. Explicit tags other than the safe ones are still refused.
    """
    import yaml

    class TextLoader(yaml.SafeLoader):
        pass

    typed = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp")}
    TextLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in typed]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    return TextLoader


def read_manifest(path: PathLike) -> List[Subject]:
    """Read a CSV (``,``, tab or ``;`` between cells, as its header line shows; ``.tsv``: tabs) or YAML
    manifest into :class:`Subject` rows (paths made absolute).

    An unpaired row (``fixed`` or ``moving`` empty) is kept, with its ``problem``: it fails alone when the batch runs.
    A CSV's blank lines and empty rows (``,,,``), above the header too, are skipped; errors name a CSV row by its
    line in the file (the row a spreadsheet shows), a YAML subject by its place in the list.

    Args:
        path: the manifest (``.csv``, ``.tsv``, ``.yaml`` or ``.yml``); relative paths in it are relative to its
            folder.

    Returns:
        One :class:`Subject` per row, in the manifest's order.

    Raises:
        UnreadableFileError: the manifest is missing, a folder, unreadable or not UTF-8, or not valid CSV/YAML.
        InvalidInputError: ``path`` is not a str or pathlib.Path, no subjects, a CSV header without subject,
            fixed, moving and output, a header cell without a name over a column holding values (an empty one is
            ignored), a row with more cells than the header, a YAML manifest that is not a list
            of subjects (or whose defaults are not a mapping), a row without a subject or output, a list where one
            value goes, an unknown column or ``register`` value, a ``series`` or ``modalities`` count
            that does not match the images, an unknown modality, subjects/outputs that repeat (outputs also when
            they differ only in letter case), or an output that is an input (its own row's or another's).
    """
    p = as_path(path, what="the manifest", images=False,
                fix="pass the manifest's path (.csv, .tsv, .yaml or .yml) as a str or pathlib.Path")
    if p.is_dir():
        raise UnreadableFileError("the manifest is a folder", fix="pass the manifest file; a dataset folder goes to "
                                  "discover(...) or run_batch(...)", path=p)
    if not p.is_file():
        raise UnreadableFileError("the manifest does not exist", fix="check the path", path=p)
    # The folder of the path as given, as the report's (beside it): resolving a symlinked manifest took the link
    # target's folder for its relative paths while the report went beside the link. Normalised as messages quote
    # paths (a link before a ".." is followed as the file system does).
    base = Path(_display_path(p.parent))
    rows: Sequence[Mapping[str, Any]]
    numbers: List[int]
    defaults: Mapping[str, Any] = {}
    from .io import is_image_file

    if is_image_file(p) or p.name.lower().endswith(".dcm"):  # it said "UnicodeDecodeError: save it as UTF-8 text"
        raise InvalidInputError("this is an image file, not a manifest", path=p,
                                fix="pass a manifest (.csv, .tsv, .yaml) or a dataset folder; fuse one pair with "
                                    "medfuse fuse FIXED MOVING -o OUT (medfuse.fuse_files in Python)")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UnreadableFileError(f"cannot read the manifest ({e.__class__.__name__})",
                                  fix="save it as UTF-8 text", path=p) from None
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(text, Loader=_text_loader())  # noqa: S506 - a SafeLoader: no Python tags
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise UnreadableFileError(f"the manifest is not valid YAML{where}",
                                      fix="check the indentation and quoting", path=p) from None
        if isinstance(data, Mapping):
            if not isinstance(data.get("defaults") or {}, Mapping):  # "'str' object has no attribute 'items'"
                raise InvalidInputError("a YAML manifest's defaults must be a mapping",
                                        fix="write them as {register: rigid, method: network}", path=p)
            defaults = {str(k).lower(): v for k, v in (data.get("defaults") or {}).items()}
            data = data.get("subjects")
        if not isinstance(data, list):
            raise InvalidInputError("a YAML manifest must be a list of subjects (or {defaults:, subjects: [...]})",
                                    fix="see 'medfuse batch --help' for an example", path=p)
        # A bare "-" is an empty entry, skipped as an empty CSV row is (it refused the whole manifest as "not a
        # list of subjects"); anything else that is no mapping is named by its place.
        odd = next((k for k, r in enumerate(data, start=1) if r is not None and not isinstance(r, Mapping)), None)
        if odd is not None:
            raise InvalidInputError(f"entry {odd} of the YAML manifest's list is not a subject (a mapping of "
                                    "subject, fixed, moving, output, ...)",
                                    fix="see 'medfuse batch --help' for an example", path=p)
        numbers = [k for k, r in enumerate(data, start=1) if r is not None]  # YAML: the subject's place in the list
        rows = [r for r in data if r is not None]
    else:
        rows, numbers = _read_csv_rows(text, p)
    if not rows:
        raise InvalidInputError("the manifest lists no subjects", fix="add one row per subject", path=p)
    subjects = [_subject_from(r, base=base, path=p, row=n, defaults=defaults) for r, n in zip(rows, numbers)]
    _check_unique(subjects, p, rows=numbers)
    return subjects


def _blank(cells: Sequence[Any]) -> bool:
    """Whether a CSV row holds nothing: no cells (a blank line), or only empty or all-space cells (the ``,,,`` or
    ``;;;;`` a spreadsheet saves for an empty row)."""
    # Separators too: a ',,,' row in a ';' file (or ';;;;' in a ',' one) is one cell of commas, and still empty.
    return not any(c is not None and str(c).strip(" \t,;") for c in cells)


def _read_csv_rows(text: str, p: Path) -> Tuple[List[Dict[Any, Any]], List[int]]:
    """A CSV/TSV manifest's rows (as ``csv.DictReader`` gives them) and the line each starts on.

    Blank rows are skipped, before the header too. Rows are numbered by their line in the file, which is the row a
    spreadsheet shows (header 1): counted in the list, a manifest with blank lines had its errors name other rows.

    Raises:
        UnreadableFileError: not valid CSV.
        InvalidInputError: a header without subject, fixed, moving and output, a header cell without a name over a
            column that holds values, or a row with more cells than the header.
    """
    lines = text.splitlines()
    # The first line that holds anything: blank lines (or a spreadsheet's empty rows) above the header were read
    # as an empty header, and every row then had "more cells than the header".
    first = next((ln for ln in lines if ln.strip(" \t,;")), "")
    # A BIDS-style .tsv, or a CSV a spreadsheet saved with ';' (locales with a decimal comma), was refused as
    # "the CSV header lacks subject, fixed, output, moving" although its header held them all.
    delimiter = "\t" if p.suffix.lower() == ".tsv" else next((d for d in (",", "\t", ";") if d in first), ",")
    sep = {"\t": "a tab", ";": "';'"}.get(delimiter, "','")
    reader = csv.reader(lines, delimiter=delimiter)
    header: Optional[List[str]] = None
    header_line = 1
    cells_of: List[List[str]] = []
    numbers: List[int] = []
    try:
        while True:
            line = reader.line_num + 1  # the line this row starts on (a quoted cell may span several)
            try:
                cells = next(reader)
            except StopIteration:
                break
            if _blank(cells):  # Excel's empty rows, rows of spaces and blank lines: no subject, no error
                continue
            if header is None:
                header, header_line = cells, line
                continue
            if len(cells) > len(header) and not _blank(cells[len(header):]):
                # More cells than the header: DictReader put them under None and they were dropped without a word
                # (an unquoted `pet;spect.nii.gz` in a ';'-separated file fused without the SPECT).
                raise InvalidInputError(f"line {line} has more cells than the header (cells are separated by {sep})",
                                        fix=f"put a cell that holds {sep} in double quotes"
                                            + (' ("s01/pet;s01/spect.nii.gz")' if delimiter == ";" else "")
                                            + ", or give further moving images columns of their own (moving2, "
                                            "...)",
                                        path=p)
            cells_of.append(cells)
            numbers.append(line)
    except csv.Error as e:
        raise UnreadableFileError(f"the manifest is not valid CSV ({e})", fix="check the quoting", path=p) from None
    header = header or []
    names = [h.strip().lower() for h in header]
    missing = [c for c in ("subject", "fixed", "output") if c not in names]
    if missing or not any(h.startswith("moving") for h in names):
        raise InvalidInputError(
            f"the CSV header lacks {', '.join(missing + ([] if any(h.startswith('moving') for h in names) else ['moving']))}",
            fix="the first line must be: subject,fixed,moving,output", path=p)
    for i, h in enumerate(header):
        if h.strip():
            continue
        # A header cell without a name (the trailing ',' a spreadsheet leaves): a column empty in every row is
        # ignored; one holding values was refused as "unknown column(s) ''", which did not say which column.
        used = next((n for cells, n in zip(cells_of, numbers) if i < len(cells) and cells[i].strip()), None)
        if used is not None:
            raise InvalidInputError(f"column {i + 1} of the header has no name, but row {used} has a value in it",
                                    fix="name the column (subject, fixed, moving, moving2, ..., output, register, "
                                        "method, series, modalities, labels), or delete it", path=p)
    named = [(i, h) for i, h in enumerate(header) if h.strip()]
    # Named once, as the header: each row's error named row 2 for a column of the header's row 1.
    _check_columns([h.strip().lower() for _, h in named], f"the header (row {header_line})", p)
    seen: Dict[str, int] = {}
    for i, h in named:
        key = h.strip().lower()
        if key in seen:
            # The second cell won and the first was dropped: "moving,moving" fused one of the two images.
            raise InvalidInputError(f"column '{key}' is named twice in the header (columns {seen[key] + 1} and "
                                    f"{i + 1})", fix="name further moving images moving2, moving3, ...; give every "
                                    "other column once", path=p)
        seen[key] = i
    rows = [{h: (cells[i] if i < len(cells) else None) for i, h in named} for cells in cells_of]
    return rows, numbers


def _check_unique(subjects: Sequence["Subject"], path: Optional[Path] = None, first_row: Optional[int] = None, *,
                  rows: Optional[Sequence[int]] = None) -> None:
    """Every subject once, and every output, and every output's sidecar, a file of its own; checked before any work.

    Outputs are compared as the files they name (``out/x.nii.gz`` and ``out/../out/x.nii.gz`` are one; symbolic
    links followed) and without letter case (one file on Windows and macOS). ``out/s.nii.gz`` and ``out/s.mha``
    share the sidecar ``out/s.json``: the second would take over the first's provenance. An output (or its
    sidecar) that is an input (another row's or its own), or lies inside an input folder, would replace that input.

    Args:
        subjects: the rows.
        path: the manifest they came from (named in the error).
        first_row: the manifest's row number of the first subject (the errors name rows); None for a list, whose
            subjects are named by their position.
        rows: each subject's manifest row number (its line in a CSV file: blank lines are not subjects but count);
            overrides ``first_row``.

    Raises:
        InvalidInputError: a subject or output appears twice, two outputs are one file (or differ only in letter
            case, or share a sidecar), or an output is an input (its own row's or another's); the message names the
            rows (patient identifiers blanked) and quotes paths normalised (``/d/out/x.nii.gz``, not
            ``/d/out/../out/x.nii.gz``).
    """
    from .provenance import sidecar_path

    p = path
    where = "the manifest" if path is not None else "the list of subjects"

    def text(value: Any) -> str:
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)

    def real(value: Any) -> str:
        # Not abspath first: it drops "link/.." by the letters, where the file system goes up from the link's target.
        return os.path.realpath(os.path.expanduser(text(value)))

    shown = _display_path

    def same_name(path: str) -> str:
        # As macOS and Windows compare names: without letter case, and (macOS) without Unicode normalisation:
        # "Café" typed (NFC, one code point for é) and "Café" as macOS's Finder stores it (NFD, e + accent) are
        # one file there, two elsewhere.
        return case_key(unicodedata.normalize("NFC", path))

    def refuse(i: int, j: Optional[int], problem: str, fix: str) -> None:
        """Refuse rows ``j`` and ``i`` (``j`` None: row ``i`` alone)."""
        from .provenance import patient_identifiers, scrub

        def who(k: int) -> str:
            where = (f"row {rows[k]}" if rows is not None else f"row {first_row + k}" if first_row is not None
                     else f"subject {k + 1}")
            return f"{where} ({subjects[k].subject!r})"

        both = [subjects[i]] if j is None else [subjects[j], subjects[i]]
        ids = patient_identifiers([x for s in both for x in (s.fixed, *s.moving, s.folder) if x and os.path.exists(x)])
        named = who(i) if j is None else f"{who(j)} and {who(i)}"
        raise InvalidInputError(scrub(f"{named}: {problem}", ids), fix=fix, path=p)

    names: Dict[str, int] = {}
    for i, s in enumerate(subjects):
        if s.subject in names:
            refuse(i, names[s.subject], f"subject {s.subject!r} appears twice in {where}",
                   "give every subject its own subject")
        names[s.subject] = i
    outputs: Dict[str, Tuple[int, str]] = {}
    sidecars: Dict[str, Tuple[int, str]] = {}
    for i, s in enumerate(subjects):
        key, full = shown(s.output), real(s.output)
        if same_name(full) in outputs:
            j, other = outputs[same_name(full)]
            if text(subjects[j].output) == text(s.output):
                refuse(i, j, f"output {key!r} appears twice in {where}", "give every subject its own output")
            if other == key:  # two spellings of one path (out/x.nii.gz, out/../out/x.nii.gz)
                refuse(i, j, f"both outputs are one file, {key!r}", "give every subject its own output")
            if real(subjects[j].output) == full:  # through a symbolic link
                refuse(i, j, f"outputs {other!r} and {key!r} are one file ({full!r})",
                       "give every subject its own output")
            # Outputs differing only in case are one file on Windows and macOS (case-insensitive file systems):
            # one subject's output would silently replace the other's, and the report call both done. So are
            # outputs differing only in Unicode normalisation on macOS.
            case = unicodedata.normalize("NFC", other) != unicodedata.normalize("NFC", key)
            how = "letter case" if case else "how their accented letters are stored (Unicode NFC or NFD: they look " \
                                             "the same)"
            refuse(i, j, f"outputs {other!r} and {key!r} differ only in {how}: on "
                         f"{'Windows and macOS' if case else 'macOS'} they are one file",
                   # Found in a dataset folder, the outputs are named after the subject folders.
                   "rename one of the two subject folders so that the names differ in more than that, or write a "
                   "manifest (medfuse batch DATASET --write-manifest) and give them distinct outputs there"
                   if s.folder and subjects[j].folder else
                   "give every subject an output whose name differs in more than that")
        outputs[same_name(full)] = (i, key)
        side = same_name(os.fspath(sidecar_path(full)))
        if side in sidecars:
            j, other = sidecars[side]
            refuse(i, j, f"outputs {other!r} and {key!r} share one provenance sidecar "
                         f"({sidecar_path(key).name}): the second would take over the first's",
                   "give the outputs names that differ before the suffix (not s.nii.gz and s.mha)")
        sidecars[side] = (i, key)
    for key, (i, out) in outputs.items():
        # Inside another row's output (a DICOM series folder): the run wrote both, and from then on the series
        # folder held a file that is not DICOM, so that row failed on every rerun, with --overwrite too.
        for place in (os.fspath(q) for q in Path(key).parents):
            if place in outputs:
                j, other = outputs[place]
                refuse(i, j, f"output {out!r} lies inside output {other!r} (a DICOM series folder)",
                       "give every subject an output outside the other outputs' folders")
    inputs: Dict[str, List[Tuple[int, str]]] = {}
    for i, s in enumerate(subjects):
        for x in (s.fixed, *s.moving):
            if x:
                inputs.setdefault(same_name(real(x)), []).append((i, shown(x)))
    for what, taken in (("output", outputs), ("the sidecar of output", sidecars)):
        for key, (j, out) in taken.items():
            # The file itself, or a folder holding it (a DICOM input folder).
            for place in (key, *(os.fspath(q) for q in Path(key).parents)):
                for i, x in inputs.get(place, ()):
                    if i != j:
                        refuse(i, j, f"{what} {out!r} is the other row's input {x!r} (or inside it): writing it "
                                     "would replace that input", "write outputs to a folder of their own, away "
                                                                 "from the inputs")
                    # Its own input: the row failed with "not verified by its provenance sidecar... rerun with
                    # --overwrite", and --overwrite then with "refusing to write onto the volume's own source".
                    refuse(i, None, f"{what} {out!r} is its own input {x!r} (or inside it): writing it would "
                                    "replace that input", "give the row an output path of its own, away from its "
                                                          "inputs")


# ----------------------------------------------------------------------------- dataset folders
#: Image files discovery takes, by their ending (any case). Analyze ``.img`` and MetaImage ``.raw`` are the
#: data halves of a ``.hdr``/``.mhd`` and are not counted twice.
_DISCOVER_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".hdr")
#: Files that are neither an image nor DICOM (notes, BIDS sidecars, snapshots, data halves).
_NOT_DICOM = (".json", ".txt", ".csv", ".tsv", ".md", ".pdf", ".xml", ".log", ".png", ".jpg", ".jpeg", ".bval",
              ".bvec", ".img", ".raw", ".zip", ".py", ".html", ".doc", ".docx", ".xls", ".xlsx", ".yaml", ".yml",
              ".tfm")  # ITK transforms (keep_registered writes them among the outputs)
#: Folders and files that file systems, NAS boxes and operating systems make (a Synology's ``@eaDir``, a USB stick's
#: ``$RECYCLE.BIN``): they were refused as subjects named like formulas, or failed as unpaired subjects.
_JUNK = ("__macosx", "thumbs.db", "desktop.ini", "@eadir", "#recycle", "#snapshot", "$recycle.bin",
         "system volume information", "lost+found", ".trashes", ".spotlight-v100", ".fseventsd")
#: Folders of a dataset that hold no subject (BIDS: derivatives, sourcedata, code).
_NOT_SUBJECTS = ("derivatives", "sourcedata", "code")
#: Words in a file name that tell its modality (BIDS suffixes included: ``_T1w``, ``_pet``; BraTS 2021/2023's
#: ``t1n``, ``t1c``, ``t2f`` and the older ``t1ce``/``t1gd``: ``BraTS-GLI-00001-000-t1n.nii.gz``).
_NAME_WORDS = {"MR": ("mr", "mri", "t1", "t1w", "t2", "t2w", "flair", "mprage", "t1n", "t1c", "t1ce", "t1gd", "t2f"),
               "CT": ("ct",),
               "PT": ("pet", "pt", "fdg"), "NM": ("spect", "nm")}
_KIND_NAMES = {"MR": "MR", "CT": "CT", "PT": "PET", "NM": "SPECT"}
#: Whole words of a file name that make it a segmentation or label map (``ct_seg``, ``sub-02_dseg``, ``pet_mask``,
#: ``t1_label``, BraTS's ``...-seg``): never an image to fuse.
_LABEL_WORDS = ("seg", "dseg", "mask", "label", "labels", "roi")


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in _JUNK


def _stem(name: str) -> str:
    """A file name without the image ending discovery knows (``seg.nii.gz`` gives ``seg``)."""
    for suf in _DISCOVER_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _is_label_name(name: str) -> bool:
    """Whether a file's name marks a segmentation or label map (a whole word of :data:`_LABEL_WORDS`).

    Why: ``ct_seg.nii.gz`` beside ``ct.nii.gz`` made the subject "ambiguous: 2 CT candidates", and ``seg.nii.gz``
    or ``sub-02_dseg.nii.gz`` were passed over without a word.
    """
    return bool(set(_plain_words(name)) & set(_LABEL_WORDS))


def _plain_words(name: str) -> List[str]:
    """The whole words of a file's name without its ending, leaving out BIDS entities (``key-value`` pairs before
    the final ``_`` suffix): ``acq-roi`` or ``label-GM`` of ``sub-01_acq-roi_T1w.nii.gz`` name no label map."""
    import re

    parts = _stem(name).lower().split("_")
    kept = [p for p in parts[:-1] if not re.fullmatch(r"[a-z]+-[a-z0-9]+", p)] + parts[-1:]
    return [w for p in kept for w in re.split(r"[^a-z0-9]+", p) if w]


def _modality_from_name(name: str) -> Optional[str]:
    """``MR``, ``CT``, ``PT`` or ``NM`` from the words of a file name; None when none or several match."""
    import re

    low = _stem(name).lower()
    parts = low.split("_")
    if len(parts) > 1 and all(re.fullmatch(r"[a-z]+-[a-z0-9]+", p) for p in parts[:-1]):
        words = {parts[-1]}  # BIDS: only the suffix tells the modality (ses-t1 is a time point, not a T1)
    else:
        words = set(re.split(r"[^a-z0-9]+", low))
    kinds = [k for k, ws in _NAME_WORDS.items() if words & set(ws)]
    return kinds[0] if len(kinds) == 1 else None


def _is_medfuse_output(image: Path) -> bool:
    """Whether ``image`` was written by medfuse (its sidecar says so): an earlier run's output, never an input."""
    from .provenance import is_medfuse_record, read_sidecar

    return is_medfuse_record(read_sidecar(image))


def _holds_inputs(folder: Path) -> bool:
    """Whether ``folder`` holds an image file or a file that might be DICOM."""
    images, maybe_dicom = _walk(folder)
    return bool(images) or maybe_dicom


def _walk(folder: Path, unreadable: Optional[List[str]] = None, *,
          skip: Optional[str] = None) -> Tuple[List[Path], bool]:
    """Image files under ``folder`` (symlinks followed, each real folder once, hidden entries and medfuse's own
    outputs skipped) and whether any other file might be DICOM. Folders that could not be listed (permission
    denied) are added to ``unreadable``, when given; the real folder ``skip`` (the outputs' folder) is not
    entered."""
    images: List[Path] = []
    maybe_dicom = False
    seen = set()
    top = os.path.realpath(folder)
    # onerror: os.walk skipped a folder it may not list without a word ("unpaired: found no image files").
    failed = (lambda e: unreadable.append(e.filename)) if unreadable is not None else None
    for root, dirs, files in os.walk(folder, followlinks=True, onerror=failed):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop, or the same series linked twice
            dirs[:] = []
            continue
        seen.add(real)
        # A link to a folder above this one (sub-01/up -> ../.., a link to /) would walk the whole dataset, or
        # the whole disk, and take other subjects' images as this one's: such links are not followed.
        reals = {d: os.path.realpath(os.path.join(root, d)) for d in dirs if not _hidden(d)}
        dirs[:] = sorted(d for d, r in reals.items() if not is_or_above(r, top) and r != skip)
        for f in sorted(files):
            low = f.lower()
            if _hidden(f) or not os.path.isfile(os.path.join(root, f)):  # a broken link
                continue
            if low.endswith(_DISCOVER_SUFFIXES):
                if not _is_medfuse_output(Path(root, f)):
                    images.append(Path(root, f))
            elif not low.endswith(_NOT_DICOM):
                maybe_dicom = True
    return images, maybe_dicom


def _ambiguous(folder: Path, problem: str, fix: str) -> InvalidInputError:
    return InvalidInputError(problem, fix=fix, path=folder)


_MANIFEST_FIX = ("list this subject in a manifest that names its fixed and moving images "
                 "('medfuse batch DATASET --write-manifest', or medfuse.batch.write_manifest(DATASET), writes one "
                 "to edit)")


def discover_subject(folder: PathLike, *, with_series: bool = False, with_labels: bool = False):
    """Find a subject's reference (fixed) and moving images in its folder.

    A subject whose chosen series share one folder is refused here (a path cannot say which series is meant);
    :func:`discover` and batch runs take it, picking each series by its modality.

    NIfTI/MetaImage/NRRD files are told apart by the words in their names (``mr``, ``t1``, ``T1w``, ``ct``,
    ``pet``, ``fdg``, ``spect``, any case); DICOM series, in any nested folder, by their Modality. Hidden
    files (``.DS_Store``), notes and BIDS ``.json`` sidecars are ignored; symlinks are followed. The fixed image
    is the MR (else the CT); the moving images are the PET and/or SPECT. A CT beside an MR (the CT of a
    PET/CT) is not used. Files whose names mark a segmentation or label map (the whole words ``seg``, ``dseg``,
    ``mask``, ``label``, ``labels``, ``roi``: ``ct_seg.nii.gz``, ``sub-01_dseg.nii.gz``) are never images to fuse.

    Args:
        folder: the subject's folder.
        with_series: also return the series choices (one per image, fixed first, ``"-"`` for none; ``None``
            when every image has a folder or file of its own), and accept series that share a folder.
        with_labels: also return the label maps found (absolute paths, sorted; last in the tuple).

    Returns:
        ``(fixed, [moving, ...])`` as absolute paths (files, or DICOM series folders); with ``with_series``,
        ``(fixed, [moving, ...], series)``; with ``with_labels``, the list of label maps after those.

    Raises:
        InvalidInputError: ``folder`` is not a str or pathlib.Path; unpaired (no MR/CT, or no PET/SPECT), or
            ambiguous (two PET series, two MRs, several series in one folder); the message names the candidates
            and how to choose.
        UnreadableFileError: ``folder`` does not exist or is a file.
    """
    root = _folder_arg(folder, "subject folder", "pass the subject's folder (a str or pathlib.Path)")
    unreadable: List[str] = []
    images, maybe_dicom = _walk(root, unreadable)
    found: Dict[str, List[Path]] = {k: [] for k in _NAME_WORDS}
    # How each candidate is named in messages, by kind as in found: its path, and for a DICOM series its
    # SeriesNumber and image count too (:func:`_candidates`).
    named: Dict[str, List[Tuple[str, str]]] = {k: [] for k in _NAME_WORDS}
    unknown: List[Path] = []
    labels = [f for f in images if _is_label_name(f.name)]

    def rel(p: Path) -> str:
        return os.fspath(p.relative_to(root)) if p != root and root in p.parents else (p.name or os.fspath(p))

    for f in images:
        if f in labels:
            continue
        kind = _modality_from_name(f.name)
        (found[kind] if kind else unknown).append(f)
        if kind:
            named[kind].append((rel(f), rel(f)))
    shared: Dict[str, List[str]] = {}
    if maybe_dicom:
        from .io import scan

        try:
            series = scan(root)
        except MedfuseError:  # no DICOM image after all (a stray file without a suffix)
            series = []
        for info in series:
            kind = info.modality.upper()
            path = Path(info.folder)
            shared.setdefault(os.fspath(path), []).append(_KIND_NAMES.get(kind, kind or "?"))
            if kind in found:
                found[kind].append(path)
                named[kind].append((rel(path), f"{rel(path)} series {info.series_number or '(no number)'} "
                                                f"({info.n_files} image{'s' if info.n_files != 1 else ''})"))

    def listing() -> str:
        parts = [f"{_KIND_NAMES[k]} {_candidates(named[k])}" for k, v in found.items() if v]
        if unknown:
            parts.append(f"unknown modality {', '.join(rel(p) for p in unknown)}")
        if labels:
            parts.append(f"label maps (not fused) {', '.join(rel(p) for p in labels)}")
        if unreadable:
            shown = ", ".join(rel(Path(u)) for u in unreadable[:3]) + (", ..." if len(unreadable) > 3 else "")
            parts.append(f"{len(unreadable)} folder(s) that may not be read (permission denied): {shown}")
        return "; ".join(parts) or "no image files or DICOM series"

    anatomy = "MR" if found["MR"] else "CT"
    functional = [k for k in ("PT", "NM") if found[k]]
    if not found[anatomy] or not functional:
        missing = "MR or CT" if not found[anatomy] else "PET or SPECT"
        hint = (" (name image files with their modality: mr, t1, ct, pet, spect)" if unknown else
                " (or let this user read its folders: chmod u+rx)" if unreadable else "")
        raise _ambiguous(root, f"unpaired: no {missing} found (found: {listing()})",
                         f"add the missing image{hint}, or leave the subject out")
    chosen = [anatomy] + functional
    for kind in chosen:
        if len(found[kind]) > 1:
            raise _ambiguous(root, f"ambiguous: {len(found[kind])} {_KIND_NAMES[kind]} candidates "
                                   f"({_candidates(named[kind])})",
                             f"move the ones not to fuse out of the subject's folder, or {_MANIFEST_FIX}")
    fixed, moving, series = os.fspath(found[anatomy][0]), [os.fspath(found[k][0]) for k in functional], None
    if any(len(shared.get(os.fspath(found[k][0]), [])) > 1 for k in chosen):
        if not with_series:
            kind = next(k for k in chosen if len(shared.get(os.fspath(found[k][0]), [])) > 1)
            kinds = shared[os.fspath(found[kind][0])]
            raise _ambiguous(root, f"the folder {rel(found[kind][0])} holds {len(kinds)} DICOM series "
                                   f"({', '.join(kinds)})", "put each series in a folder of its own, or run the "
                                   "dataset with medfuse batch (it picks each series by its modality)")
        # Several series side by side (a PACS export): each picked by its modality, which is unique here
        # (two of a kind were refused above as ambiguous).
        series = [k if len(shared.get(os.fspath(found[k][0]), [])) > 1 else "-" for k in chosen]
    found_labels = [os.fspath(f) for f in labels]
    return (fixed, moving, *([series] if with_series else []), *([found_labels] if with_labels else []))


def _candidates(named: Sequence[Tuple[str, str]]) -> str:
    """Candidates of one kind as a message lists them: each by its path, or, where several share a path (DICOM series
    side by side in one folder, which were listed as "export, export"), by its SeriesNumber and image count too
    (never its SeriesDescription, which may hold patient data)."""
    paths = [plain for plain, _ in named]
    return ", ".join(plain if paths.count(plain) == 1 else detailed for plain, detailed in named)


def _dataset_out_dir(dataset: Path, out_dir: Optional[PathLike]) -> Path:
    # Normalised (not resolved): the report quoted /d/ds/../out/sub-01_fused.nii.gz.
    return Path(_display_path(out_dir)) if out_dir else dataset / "derivatives" / "medfuse"


def _describe_derivatives(dataset: Path, out: Path) -> Optional[Path]:
    """Give a BIDS dataset's outputs' folder the ``dataset_description.json`` of a derivative dataset.

    Why: BIDS tools index a derivatives folder only with one (pybids, ``BIDSLayout(..., derivatives=True)``,
    found no valid derivatives and left every output out). Written only when ``dataset`` is BIDS (it has its
    own description) and the folder has none: a description someone wrote is never replaced. A failure to write
    it is a warning: the outputs matter more than their index.
    """
    import warnings

    from .errors import MedfuseWarning
    from .io._atomic import atomic_write_text

    raw, target = dataset / "dataset_description.json", out / "dataset_description.json"
    if not raw.is_file() or target.exists() or target.is_symlink():
        return None
    try:
        version = json.loads(raw.read_text(encoding="utf-8-sig")).get("BIDSVersion")
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, or not an object
        version = None
    from . import __version__

    description = {  # BIDS, "Derived dataset and pipeline description": Name, BIDSVersion, GeneratedBy required
        "Name": "medfuse fused images",
        "BIDSVersion": version if isinstance(version, str) and version.strip() else "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "medfuse", "Version": __version__,
                         "Description": "multimodal fusion onto each subject's fixed image grid (medfuse batch); "
                                        "each output's JSON sidecar records its inputs, steps and parameters"}],
    }
    try:
        return atomic_write_text(target, json.dumps(description, indent=2) + "\n")
    except (OSError, MedfuseError) as e:
        warnings.warn(f"could not write {target.name} in the outputs' folder ({e.__class__.__name__}); BIDS tools "
                      "will not index the outputs until it exists", MedfuseWarning, stacklevel=4)
        return None


def _only_outputs(folder: Path) -> bool:
    """A folder with medfuse outputs in it and nothing else an input could be (no other image, no DICOM)."""
    images, maybe_dicom = _walk(folder)
    if images or maybe_dicom:
        return False
    return any(_is_medfuse_output(Path(root, f)) for root, _, files in os.walk(folder)
               for f in files if f.lower().endswith(_DISCOVER_SUFFIXES))


_DATASET_FIX = ("pass the folder holding one folder per subject, as a str or pathlib.Path (a manifest file goes to "
                "read_manifest(...) or run_batch(...))")
_OUT_DIR_FIX = "pass the outputs' folder as a str or pathlib.Path, or None for DATASET/derivatives/medfuse"


def discover(dataset: PathLike, *, out_dir: Optional[PathLike] = None) -> List[Subject]:
    """One :class:`Subject` per sub-folder of ``dataset`` (sorted; hidden ones, ``derivatives``,
    ``sourcedata``, ``code``, ``out_dir`` and folders holding only medfuse outputs left out). Their images are
    found when each subject runs (:func:`discover_subject`), so an unpaired or ambiguous subject fails alone.

    Args:
        dataset: the folder holding one folder per subject (named as you like: ``sub-01``, ``P001``).
        out_dir: where outputs go (``<subject>_fused.nii.gz``); default ``DATASET/derivatives/medfuse``.

    Returns:
        The subjects, with ``folder`` and ``output`` set and ``fixed``/``moving`` left empty.

    Raises:
        InvalidInputError: the folder holds no subject folders, ``dataset`` or ``out_dir`` is not a str or
            pathlib.Path, or ``out_dir`` is (or lies in) a subject's folder holding images (that subject was left
            out without a word).
        UnreadableFileError: ``dataset`` is missing, a file or unreadable.
    """
    root = Path(_display_path(_folder_arg(dataset, "dataset", _DATASET_FIX)))
    out = _dataset_out_dir(root, _optional_path(out_dir, "out_dir", _OUT_DIR_FIX))
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise UnreadableFileError(f"cannot list the dataset folder ({e.__class__.__name__})",
                                  fix="check that you may read it", path=root) from None
    subjects = []
    real_out = os.path.realpath(out)
    for entry in entries:
        path = Path(entry.path)
        if _hidden(entry.name) or entry.name.lower() in _NOT_SUBJECTS or not path.is_dir():
            continue
        real = os.path.realpath(path)
        if real_out == real or real_out.startswith(real + os.sep):
            # The outputs' folder (or a folder holding only it) is no subject; a subject's folder holding the
            # outputs' folder was left out of the run without a word (exit 0, in neither table nor report).
            _refuse_out_in_subject(path, out, skip=real_out if real_out != real else None)
            continue
        if _only_outputs(path):  # an earlier run's outputs (a manifest's out/ folder) are no subject either
            continue
        if _formula_like(entry.name):
            if not _holds_inputs(path):  # no subject (a NAS's "@eaDir" spelt otherwise): not quoted in the report
                continue
            raise InvalidInputError(f"the subject folder {entry.name!r} is named like a spreadsheet formula "
                                    "(it starts with =, +, - or @)",
                                    fix="rename the folder: the report repeats it as the subject id, and a "
                                        "spreadsheet opening the report would run it as a formula", path=root)
        output = os.fspath(out / f"{entry.name}_fused.nii.gz")
        subjects.append(Subject(subject=entry.name, fixed="", moving=[], output=output, folder=os.fspath(path)))
    if not subjects:
        raise InvalidInputError("no subject folders found (batch takes a manifest, or a dataset folder holding "
                                "one folder per subject)", fix="point to the dataset's top folder, or write a "
                                "manifest (see docs/pipeline.md)", path=root)
    return subjects


def _refuse_out_in_subject(folder: Path, out: Path, *, skip: Optional[str]) -> None:
    """Refuse an outputs' folder that is (or lies in) a subject's folder holding anything an input could be.

    Raises:
        InvalidInputError: ``folder`` holds an image or a possible DICOM file outside the outputs' folder
            ``skip`` (the real path; None: the outputs' folder is ``folder`` itself).
    """
    images, maybe_dicom = _walk(folder, skip=skip)
    if not images and not maybe_dicom:
        return
    from .provenance import patient_identifiers, scrub

    ids = patient_identifiers([folder])  # a subject folder named after its patient is not quoted
    where = "is the subject folder" if skip is None else "lies inside the subject folder"
    raise InvalidInputError(scrub(f"the outputs' folder {where} {folder.name!r}: that subject would be left out of "
                                  "the batch", ids),
                            fix="pass out_dir= (--out) a folder outside every subject folder (the default is "
                                "DATASET/derivatives/medfuse)", path=scrub(_display_path(out), ids))


def write_manifest(dataset: PathLike, path: Optional[PathLike] = None, *, out_dir: Optional[PathLike] = None,
                   register: Optional[str] = None, method: Optional[str] = None) -> Path:
    """Discover a dataset's subjects now and write them as a CSV manifest to review or edit.

    An unpaired or ambiguous subject gets a row with the cells discovery could not fill left empty (it
    fails alone until they are filled). Writes no patient data: paths and modalities only.

    Args:
        dataset: the folder holding one folder per subject (as :func:`discover`).
        path: where to write the manifest; default ``DATASET/derivatives/medfuse/manifest.csv`` (or
            ``OUT_DIR/manifest.csv``).
        out_dir: where the manifest's outputs go (as :func:`discover`).
        register: the registration each subject gets (``"none"``, ``"rigid"``, ``"affine"`` or
            ``"deformable"``), written as a ``register`` column so that the manifest runs as it was meant; None
            (default): no such column (``medfuse batch MANIFEST --register ...`` then says it).
        method: the fusion method each subject gets, written as a ``method`` column; None (default): no such
            column (the batch's ``method``, network by default).

    Returns:
        The manifest's path; never replaces a file.

    Raises:
        InvalidInputError: the dataset holds no subject folders, or ``dataset``, ``path`` or ``out_dir`` is not a
            str or pathlib.Path.
        UnreadableFileError: ``dataset`` is missing, a file or unreadable.
        OutputExistsError: a file is already at ``path``.
        OutputWriteError: it (or its folder) cannot be written (permission, read-only or full disk, a file where
            a folder goes); ``errno`` says which.
    """
    import io

    from .io._atomic import atomic_write_text

    root = Path(_display_path(_folder_arg(dataset, "dataset", _DATASET_FIX)))
    given = _optional_path(path, "the manifest's path", "pass where to write the manifest (a .csv path) as a str "
                                                        "or pathlib.Path, or None for the default")
    out = _optional_path(out_dir, "out_dir", _OUT_DIR_FIX)
    if register is not None:
        register = choice(register.strip().lower() if isinstance(register, str) else register, "register",
                          ("none", "rigid", "affine", "deformable"), fix="use 'none', 'rigid', 'affine' or 'deformable'")
    if method is not None:
        from .pipeline import _fusion_method

        method = "none" if isinstance(method, str) and method.strip().lower() == "none" else _fusion_method(method)
    target = given if given else _dataset_out_dir(root, out) / "manifest.csv"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    rows = []
    for s in discover(root, out_dir=out):
        note = ""
        try:
            fixed, moving, series, labels = discover_subject(s.folder, with_series=True, with_labels=True)
        except InvalidInputError as e:
            # Why the cells are empty (unpaired: what was found; ambiguous: the candidates), which the row
            # otherwise did not say; paths inside the subject's folder, as the run's error gives them.
            fixed, moving, series, labels, note = "", [], None, [], _scrubbed(e.problem, [s.folder])
            note = os.fsencode(note).decode("utf-8", "backslashreplace")  # a name that is not UTF-8, shown
        with warnings.catch_warnings():  # the run says them; here the files are only read for their modality
            warnings.simplefilter("ignore", MedfuseWarning)
            codes = _name_modalities([fixed, *moving]) if fixed else None
        rows.append([s.subject, _manifest_text(fixed), ";".join(_manifest_text(m) for m in moving),
                     _manifest_text(s.output), ";".join(series or []), " ".join(codes or []), note,
                     ";".join(_manifest_text(x) for x in labels)])
    # Each column only when some subject needs it: series for several series in a folder, modalities for files
    # that state none (what the run takes from their names; '-': a DICOM series' own Modality), labels for label
    # maps found (never fused; carried onto the fixed grid by --keep-registered), note for a subject discovery could
    # not pair (the manifest reader ignores it, and repeats it in the row's error).
    cols = [c for c, k in (("series", 4), ("modalities", 5), ("labels", 7)) if any(r[k] for r in rows)]
    extra = {k: v for k, v in (("register", register), ("method", method)) if v}
    notes = ["note"] if any(r[6] for r in rows) else []
    w.writerow(["subject", "fixed", "moving", "output"] + cols + list(extra) + notes)
    for r in rows:
        w.writerow(r[:4] + [r[{"series": 4, "modalities": 5, "labels": 7}[c]] for c in cols] + list(extra.values())
                   + [r[6] for _ in notes])
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _folder_error(e, target.parent, "cannot create the manifest's folder",
                            fix="pass path= a place you can write to") from None
    written = atomic_write_text(target, buf.getvalue())
    outputs = _dataset_out_dir(root, out)
    if outputs.is_dir():  # the review-edit-run route never passes the dataset folder, which describes it
        _describe_derivatives(root, outputs)
    return written


# ----------------------------------------------------------------------------- worker side
def cap_threads(n: int) -> None:
    """Bound this process's ITK, torch and OpenMP/BLAS thread pools to ``n`` threads.

    Environment variables cover libraries loaded later; SimpleITK and an already-imported torch are
    set directly.

    Args:
        n: threads per pool, 1 or more.

    Raises:
        InvalidInputError: ``n`` is not a whole number of 1 or more.
    """
    n = whole(n, "threads", minimum=1, maximum=MAX_THREADS, example="threads=2")
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(n)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    except ImportError:  # pragma: no cover - SimpleITK is a core dependency
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            torch.set_num_threads(n)
        except Exception:  # noqa: BLE001 - an exotic torch build must not fail the subject
            pass


def _one_line(e: BaseException) -> str:
    if isinstance(e, MedfuseError):
        return e.one_line()
    return f"internal error {e.__class__.__name__}: {' '.join(str(e).split())[:300]}"


def _scrubbed(text: str, inputs: Sequence[Any]) -> str:
    """``text`` with the subject's patient identifiers (from its readable DICOM inputs) blanked: an error
    may quote a path whose folder is named after the patient."""
    from .provenance import patient_identifiers, scrub

    return scrub(text, patient_identifiers([p for p in inputs if p and os.path.exists(p)]))  # False where not allowed


def _stale_reason(rec: Optional[Mapping[str, Any]], output: Path, inputs: Sequence[str],
                  parameters: Mapping[str, Any], expect: Mapping[str, Any]) -> Optional[str]:
    """Why a medfuse output that its sidecar verifies is out of date (None: it is current).

    Raises:
        OutputExistsError: the output is not verified by a medfuse sidecar (someone's own file, an edited
            output): only ``overwrite`` may replace it.
    """
    from .provenance import _jsonable, hash_path, is_medfuse_record

    recorded = rec.get("output") if is_medfuse_record(rec) and isinstance(rec.get("output"), Mapping) else None
    current_sha = hash_path(output) if recorded is not None else None
    # A run killed while saving leaves the sidecar saying so (see pipeline.SaveStep): the earlier output it was
    # replacing (``replaces_sha256``), or whatever it was writing (``in_progress``), is medfuse's own, unfinished.
    # Only the earlier output itself, except for a header + data pair (.mhd/.nhdr), which its writer puts in
    # place before the sidecar is finished.
    if recorded is not None and recorded.get("sha256") != current_sha and (
            (recorded.get("in_progress") is True and output.name.lower().endswith((".mhd", ".nhdr")))
            or (recorded.get("replaces_sha256") and recorded.get("replaces_sha256") == current_sha)):
        return "an earlier run was interrupted while writing it"
    verified = recorded is not None and recorded.get("sha256") == current_sha
    if not verified:
        raise OutputExistsError("the output exists and is not verified by its provenance sidecar (not made by "
                                "medfuse, or changed since)", fix="rerun with --overwrite (overwrite=True) to redo "
                                "it, or move it away", path=_display_path(output))
    try:
        current = [hash_path(p) for p in inputs]
    except MedfuseError:
        current = None  # an input is gone: the run says which
    if [i.get("sha256") for i in rec.get("inputs", [])] != current:
        return "inputs changed"
    if rec.get("parameters") != _jsonable(dict(parameters)):
        changed = sorted(k for k in set(rec.get("parameters") or {}) | set(parameters)
                         if (rec.get("parameters") or {}).get(k) != _jsonable(dict(parameters)).get(k))
        return f"parameters changed ({', '.join(changed)})"
    if "results_version" in expect and rec.get("results_version") != expect["results_version"]:
        made = rec.get("results_version")
        return (f"made by an earlier medfuse, whose results may differ (results version "
                f"{'none recorded' if made is None else made}, now {expect['results_version']})")
    if rec.get("method_used") != expect.get("method_used"):
        return f"made by {rec.get('method_used')}, not {expect.get('method_used')} (a fallback)"
    if "weights_sha256" in expect and rec.get("weights_sha256") != expect["weights_sha256"]:
        return "network weights changed"
    return None


def _unregistered_as_recorded(params: Dict[str, Any], rec: Any) -> Dict[str, Any]:
    """``params`` to compare with the sidecar ``rec``'s: when neither registers (register kind None), the register
    step's other values (its ITK ``threads``) are taken as recorded.

    Why: the step does nothing then, so the output does not depend on them, yet a ``--threads-per-worker`` change
    redid every subject ("parameters changed (register)") into byte-identical outputs. Compared here, not left out
    of the record: sidecars written before keep matching. With a registration, threads still count (more than one
    makes the result vary).
    """
    recorded = rec.get("parameters") if isinstance(rec, Mapping) else None
    ours = params.get("register")
    theirs = recorded.get("register") if isinstance(recorded, Mapping) else None
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping) and ours.get("kind") is None \
            and "kind" in theirs and theirs.get("kind") is None:
        return {**params, "register": dict(theirs)}
    return params


def _suv_as_recorded(params: Dict[str, Any], rec: Any, inputs: Sequence[str]) -> Dict[str, Any]:
    """``params`` to compare with the sidecar ``rec``'s: when no input can be read otherwise for another ``suv``
    (:func:`_suv_can_apply`), the load step's ``suv`` is taken as recorded.

    Why: a ``--suv`` change redid every subject ("parameters changed (load)"), those of MR + NIfTI PET without a
    PET-BIDS sidecar too, whose volumes ``suv`` does not change. Compared here, not left out of the record, as
    :func:`_unregistered_as_recorded` does for threads; the record's inputs must be these very files (their hashes),
    else the output is redone anyway.
    """
    recorded = rec.get("parameters") if isinstance(rec, Mapping) else None
    ours = params.get("load")
    theirs = recorded.get("load") if isinstance(recorded, Mapping) else None
    if not (isinstance(ours, Mapping) and isinstance(theirs, Mapping) and "suv" in theirs
            and ours.get("suv") != theirs.get("suv")):
        return params
    facts = rec.get("inputs")
    if not isinstance(facts, list) or len(facts) != len(inputs) or any(_suv_can_apply(p, f)
                                                                          for p, f in zip(inputs, facts)):
        return params
    return {**params, "load": {**ours, "suv": theirs["suv"]}}


def _suv_can_apply(path: str, facts: Any) -> bool:
    """Whether ``suv`` may change how the input ``path`` loads; True when unsure (a wrong "up to date" is worse than
    a redo).

    Args:
        path: the input (a file or DICOM folder).
        facts: what its output's sidecar recorded about it as loaded (modality, unit, SUV facts).

    A NIfTI/MetaImage/NRRD file: only with a PET-BIDS sidecar beside it holding SUV fields (``pet_bids.SUV_FIELDS``;
    one that cannot be read counts). A DICOM input: unless it loaded as an MR or CT with no SUV fact and a unit no
    PET has.
    """
    from .io.pet_bids import SUV_FIELDS, load_json, sidecar_path
    from .pipeline import _is_plain_file

    if not isinstance(facts, Mapping):
        return True
    if _is_plain_file(path):  # as the load step tells a file from DICOM
        meta, why = load_json(sidecar_path(Path(path)))
        return why is not None or (isinstance(meta, dict) and any(k in meta for k in SUV_FIELDS))
    unit = str(facts.get("unit") or "")
    return (facts.get("modality") not in ("MR", "CT") or any(k.startswith("suv") for k in facts)
            or unit.upper().startswith("SUV") or unit in ("Bq/mL", "counts", "CNTS"))


def _from_sidecar(res: SubjectResult, rec: Optional[Mapping[str, Any]]) -> None:
    """Fill a result's columns from the output's provenance (what the run that made it recorded)."""
    if not isinstance(rec, Mapping):
        return
    res.method_used = rec.get("method_used")
    regs = rec.get("registration") or []
    ran = [r for r in (regs if isinstance(regs, list) else []) if isinstance(r, Mapping)]  # None: not registered
    # False, not empty, for a registration that looked fine: an empty cell read as "not registered".
    res.registration_suspect = any(bool(r.get("suspect")) for r in ran) if ran else None
    # What the registration module returned, as it returned it (the largest of several registrations).
    for attr in ("rotation_deg", "translation_mm"):
        got = [float(r[attr]) for r in ran if isinstance(r.get(attr), (int, float))]
        setattr(res, attr, round(max(got), 2) if got else None)
    turns = [_turn(r.get("initialisation")) for r in ran]
    res.turned_start = (";".join(t for t in turns if t) or False) if ran else None
    res.finished_utc = rec.get("created_utc")
    res.medfuse_version = (rec.get("versions") or {}).get("medfuse")


def _turn(initialisation: Any) -> Optional[str]:
    """The turn of a registration's winning start from its report's ``initialisation`` (``"turned 180y+world>world"``
    gives ``"180y"``); None for an unturned start."""
    if not isinstance(initialisation, str) or not initialisation.startswith("turned "):
        return None
    return initialisation[len("turned "):].split("+", 1)[0].strip() or "turned"


def _folder_error(e: OSError, folder: Path, problem: str, *, fix: str) -> OutputWriteError:
    """:func:`medfuse.io._atomic.folder_error` with the folder quoted as batch messages quote paths."""
    from .io._atomic import folder_error

    return folder_error(e, _display_path(folder), problem, fix=fix)


def _make_output_folder(out: Path) -> None:
    """Create the output's folder, or say in the user's words why it cannot be: an unwritable folder or a file
    in the way was reported as an "internal error PermissionError" (a bug to report) for every subject.

    Raises:
        OutputWriteError: the folder cannot be made (permission denied, read-only or full disk, a file of that
            name in the way); ``errno`` says which.
    """
    from .io._atomic import _typed_os_error

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        typed = _typed_os_error(e, out.parent)
        if typed is not None:
            raise typed from None
        blocker = next((p for p in (out.parent, *out.parent.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            # A write error: another output name in that folder would fail the same way.
            raise OutputWriteError("cannot create the output's folder: a file of that name is in the way",
                                   errno=errno.ENOTDIR, fix="move that file, or give the subject another output path",
                                   path=_display_path(blocker)) from None
        raise _folder_error(e, out.parent, "cannot create the output's folder",
                            fix="choose an output folder you can write to") from None


def _as_subject(subject: Any, *, caller: str = "run_subject") -> Subject:
    """``subject`` as a :class:`Subject`, or a typed error (the dataclass said only "unexpected keyword")."""
    if isinstance(subject, Subject):
        return subject
    names = {f.name for f in fields(Subject)}
    required = {f.name for f in fields(Subject) if f.default is MISSING and f.default_factory is MISSING}
    if isinstance(subject, Mapping) and required <= set(subject) <= names:
        fields_ = dict(subject)
        if isinstance(fields_["moving"], (str, os.PathLike)):
            # One path, as a manifest's moving column gives it: iterated, "pet.nii.gz" became one input per
            # character, and "/" one that was the whole disk.
            fields_["moving"] = [fields_["moving"]]
        return Subject(**fields_)
    why = ""
    if isinstance(subject, Mapping):
        unknown, missing = sorted(set(subject) - names), sorted(required - set(subject))
        why = (f" with unknown keys {unknown}" if unknown else "") + (f" without {missing}" if missing else "")
    raise InvalidInputError(f"{caller} takes a Subject or a dict of its fields, got {describe(subject)}{why}",
                            fix="pass a row of read_manifest(...) or discover(...), or Subject(subject=..., ...)")


def run_subject(subject: Union[Subject, Mapping[str, Any]], options: Mapping[str, Any], *,
                cancel: Optional[CancelToken] = None) -> Dict[str, Any]:
    """Fuse one subject (runs on a Dask worker, or in-process). A subject's failure is returned, never raised.

    An existing output is skipped when its sidecar shows it current; redone when the sidecar verifies it
    as medfuse's but stale (inputs, parameters, method or weights changed: the new output replaces it
    atomically, and ``note`` says why); and left alone, as a failure, when no sidecar verifies it (unless
    ``overwrite``).

    Args:
        subject: a :class:`Subject` (or its dict).
        options: ``register``, ``method``, ``device``, ``fallback``, ``threads``, ``overwrite`` defaults;
            ``pseudonym_key`` (:func:`medfuse.io.dicom_writer.current_key` of the run) for de-identified DICOM;
            ``stop_file``: a path whose existence means the batch was cancelled (the subject is then not run);
            ``stop_event``: the name of a ``distributed.Event`` whose setting means the same, read while the
            subject runs too (remote clusters; used when ``cancel`` is None).
        cancel: stops the subject at the pipeline's next check (in-process runs).

    Returns:
        A :class:`SubjectResult` as a dict.

    Raises:
        InvalidInputError: ``subject`` is neither a :class:`Subject` nor a mapping of its fields (a programming
            error, raised before the subject runs; a subject that fails is returned).
    """
    s = _as_subject(subject)
    stop = options.get("stop_file")
    if cancel is None and options.get("stop_event"):
        cancel = _RunStop(options["stop_event"])  # a remote worker: the run's cancel reaches it mid-subject
    t0 = time.perf_counter()
    res = SubjectResult(subject=s.subject, status="failed", output=s.output, worker=f"pid {os.getpid()}")
    inputs = [s.fixed, *s.moving]
    said: List[str] = []
    try:
        if (stop and os.path.exists(stop)) or (isinstance(cancel, _RunStop) and cancel.cancelled):
            # The batch was cancelled before this subject started (_run_on_dask).
            # Its row gets the columns below as any cancelled row (it returned before them, without its inputs).
            res.status, res.error = "cancelled", "not run: the batch was cancelled"
        else:
            # medfuse's warnings go into the row, blanked (printed raw by a Dask worker, they named patient
            # folders).
            from .io.dicom_writer import using_key

            # The run's pseudonym key (a worker process has its own): its DICOM outputs on one fixed series share
            # their pseudonymous study, frame of reference and patient.
            with _subject_warnings() as said, using_key(options.get("pseudonym_key")):
                inputs = _fill_result(s, res, options, cancel, inputs)
    finally:
        res.warnings = "; ".join(dict.fromkeys(" ".join(m.split()) for m in said)) or None
        if res.status in ("failed", "cancelled"):
            # What is known of a subject that made no output (its row had these columns empty): when it ended, the
            # medfuse that ran it, and the images it was given (none for a dataset subject discovery refused).
            from . import __version__

            res.finished_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            res.medfuse_version = __version__
            res.inputs = res.inputs or ";".join(x for x in inputs if x) or None
            if res.outputs is None and any(inputs):
                res.outputs = {"inputs": [x for x in inputs if x]}
        # Header values (a DICOM folder named after the patient) are blanked from what the report quotes;
        # the subject's folder too: discovery's messages quote paths in it. Every row, skipped and unpaired
        # ones included (their early exits once returned before this blanking).
        known = [*_known_inputs(inputs, res), s.folder]
        for attr in ("error", "inputs", "warnings"):
            if getattr(res, attr):
                setattr(res, attr, _scrubbed(getattr(res, attr), known))
        if res.outputs:
            res.outputs = _paths_mapped(res.outputs, lambda x: _scrubbed(x, known), keys=True)
        res.seconds = round(time.perf_counter() - t0, 3)
    return asdict(res)


_CAPTURE = threading.local()
_CAPTURE_LOCK = threading.Lock()
_CAPTURE_STATE: Dict[str, Any] = {"users": 0, "shown_by": None}


@contextlib.contextmanager
def _subject_warnings() -> Iterator[List[str]]:
    """Collect the MedfuseWarnings raised in this thread (into the subject's row); other threads' warnings and
    other categories are shown as before.

    Why not ``warnings.catch_warnings``: it swaps process-wide state, so with several threads a worker (a remote
    ``dask worker`` runs one per core) one subject's warning landed in another's row, and another's was printed
    raw in the worker's log. Here a ``showwarning`` hook, installed while any subject runs, routes each warning by
    the thread that raised it, and an "always" filter keeps a repeated warning from being dropped as seen.
    """
    said: List[str] = []
    with _CAPTURE_LOCK:
        if _CAPTURE_STATE["users"] == 0:
            _CAPTURE_STATE["shown_by"] = warnings.showwarning
            warnings.showwarning = _route_warning
            warnings.filterwarnings("always", category=MedfuseWarning)
            _CAPTURE_STATE["filter"] = warnings.filters[0]
        _CAPTURE_STATE["users"] += 1
    _CAPTURE.said = said
    try:
        yield said
    finally:
        _CAPTURE.said = None
        with _CAPTURE_LOCK:
            _CAPTURE_STATE["users"] -= 1
            if _CAPTURE_STATE["users"] == 0:
                if warnings.showwarning is _route_warning:  # else someone replaced it since: theirs stays
                    warnings.showwarning = _CAPTURE_STATE["shown_by"]
                with contextlib.suppress(ValueError):
                    warnings.filters.remove(_CAPTURE_STATE["filter"])
                    getattr(warnings, "_filters_mutated", lambda: None)()


def _route_warning(message, category, filename, lineno, file=None, line=None) -> None:
    said = getattr(_CAPTURE, "said", None)
    if said is not None and issubclass(category, MedfuseWarning):
        said.append(str(message))
        return
    shown_by = _CAPTURE_STATE["shown_by"] or warnings._showwarning_orig  # noqa: SLF001 - the default, as a fallback
    shown_by(message, category, filename, lineno, file, line)


def _known_inputs(inputs: Sequence[str], res: SubjectResult) -> List[str]:
    """The subject's inputs as far as they are known: discovery's, once it ran (``res.outputs``), and the row's."""
    found = (res.outputs or {}).get("inputs") or []
    return list(dict.fromkeys([*found, *(x for x in inputs if x)]))


def _paths_mapped(value: Any, fn: Any, *, keys: bool = False) -> Any:
    """``value`` (a row's ``outputs``: mappings and lists of paths) with ``fn`` applied to every text in it, and with
    ``keys`` to its mappings' keys too (a scrub: no key may carry a patient identifier either)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Mapping):
        return {(fn(k) if keys and isinstance(k, str) else k): _paths_mapped(v, fn, keys=keys)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_paths_mapped(v, fn, keys=keys) for v in value]
    return value


def _fill_result(s: Subject, res: SubjectResult, options: Mapping[str, Any], cancel: Optional[CancelToken],
                 inputs: List[str]) -> List[str]:
    """Run one subject, filling ``res`` (never raising a subject's failure); returns the inputs used."""
    labels: List[str] = list(s.labels or [])
    keep = False
    try:
        if s.problem:
            res.error = s.problem
            return inputs
        series, codes = s.series, s.modalities
        if s.folder and not s.fixed:
            fixed, moving, series, found = discover_subject(s.folder, with_series=True, with_labels=True)
            inputs = [fixed, *moving]
            labels = labels or found
            codes = _name_modalities(inputs)
        modalities = [None if c == "-" else c for c in codes] if codes else None
        res.inputs = ";".join(inputs)
        res.outputs = {"inputs": list(inputs)}
        _refuse_own_input(s.output, inputs)
        method = s.method or options.get("method") or "network"
        if method != "none" and len(inputs) > 3:
            # Refused before any work: it failed after loading and registering all of them, writing nothing.
            raise InvalidInputError(f"fusion takes two or three images; this subject has {len(inputs)}",
                                    fix="run it with --method none (method none in its manifest row): every moving "
                                        "image registered onto the fixed grid and written, no fusion; or give it at "
                                        "most two moving images")
        threads = int(options.get("threads") or 1)
        if options.get("cap_process_threads", True):
            cap_threads(threads)  # a worker process: bound every pool, not just registration's
        from .pipeline import Pipeline, _weights_sha256, fuse_files
        from .provenance import is_up_to_date, read_sidecar

        register = s.register if s.register is not None else options.get("register")
        register = None if register == "none" else register
        keep = bool(options.get("keep_registered")) or method == "none"
        kw = dict(register=register, method=method, device=options.get("device", "cpu"),
                  fallback=options.get("fallback"), threads=threads, suv=options.get("suv"))
        if method == "none":
            _register_only(s, res, inputs, labels, kw, series, modalities, options, cancel)
            return inputs
        # What the output must have been made with: a fallback's output, or other weights', is redone.
        from .provenance import RESULTS_VERSION

        # ... and by this generation of medfuse's results (an output of an earlier one may differ).
        expect = {"method_used": method, "results_version": RESULTS_VERSION,
                  **({"weights_sha256": _weights_sha256()} if method == "network" else {})}
        # As fuse_files records them (pipeline_parameters takes no modalities).
        params = Pipeline(**kw, series=series, modalities=modalities).parameters()
        overwrite = bool(options.get("overwrite"))
        # The user's --overwrite (for files no medfuse sidecar verifies) apart from replacing our own stale fused
        # output: one flag for both let a redone subject write over a user's file at a kept path without a word.
        replace_out = overwrite
        out = Path(s.output)
        res.outputs["fused"] = os.fspath(out)
        if out.exists():
            rec = read_sidecar(out)
            params = _suv_as_recorded(_unregistered_as_recorded(params, rec), rec, inputs)
            if is_up_to_date(out, input_paths=inputs, parameters=params, expect=expect):
                stale = _registered_stale(out, rec, inputs, labels) if keep else None
                _from_sidecar(res, rec)
                if not stale:
                    res.status = "skipped"
                    if keep:
                        cell, res.outputs = _kept_outputs(out, out, rec, inputs, labels, fused=True)
                        res.registered_outputs = ";".join(cell) or None
                        res.note = "; ".join(_label_notes(rec)) or None
                    return inputs
                if stale == _FIXED_ONLY:  # an earlier medfuse's kept files, all current: only the new fixed copy
                    pipe = Pipeline(**{**kw, "register": None, "method": "mean", "fallback": None}, series=series,
                                    modalities=modalities)
                    cell, res.outputs = _write_fixed_only(out, rec, inputs, _registration_only(pipe),
                                                          overwrite=overwrite, labels=labels, cancel=cancel)
                    res.registered_outputs = ";".join(cell) or None
                    res.status = "done"
                    res.note = "; ".join(["fixed image re-saved; the fused output and registered images were up to "
                                          "date", *_label_notes(rec)])
                    return inputs
                # The fused output is current and stays as it is; only the registered images are made again.
                pipe = Pipeline(**kw, series=series, modalities=modalities)
                made, kept = _run_keeping(pipe, inputs, None, overwrite=False, cancel=cancel)
                cell, res.outputs, notes = _write_registered(out, inputs, made, kept, overwrite=overwrite,
                                                             labels=labels)
                res.registered_outputs = ";".join(cell) or None
                res.status = "done"
                res.note = "; ".join([f"registered images written ({stale}); the fused output was up to date",
                                      *notes])
                return inputs
            if not overwrite:
                # Our own stale output is redone; anything else only with overwrite.
                res.note = f"redone: {_stale_reason(rec, out, inputs, params, expect)}"
                replace_out = True
        _make_output_folder(out)
        try:
            if keep:
                made, kept = _run_keeping(Pipeline(**kw, series=series, modalities=modalities), inputs, out,
                                          overwrite=replace_out, cancel=cancel)
            else:
                made = fuse_files(inputs[0], inputs[1:], out, overwrite=replace_out, cancel=cancel, series=series,
                                  modalities=modalities, **kw)
        except OutputExistsError:
            # Another batch (another manifest naming the same outputs) wrote it meanwhile: an output its sidecar
            # shows current is this subject done, not a failure telling the user to --overwrite a valid result.
            rec = read_sidecar(out) if not replace_out and out.exists() else None
            if rec is None or not is_up_to_date(out, input_paths=inputs, expect=expect,
                                                parameters=_unregistered_as_recorded(params, rec)):
                raise
            res.status = "skipped"
            res.note = "written meanwhile by another run; its sidecar shows it up to date"
            _from_sidecar(res, rec)
            return inputs
        if keep:
            try:
                cell, res.outputs, notes = _write_registered(out, inputs, made, kept, overwrite=overwrite,
                                                             labels=labels)
            except OutputExistsError:
                if res.note and res.note.startswith("redone: "):
                    # The fused output is written and current: only the kept files were refused (the note said
                    # "not redone: the old output is still there and stale").
                    res.note = "fused output " + res.note
                raise
            res.registered_outputs = ";".join(cell) or None
            if notes:
                res.note = "; ".join([*([res.note] if res.note else []), *notes])
        res.status = "done"
        _from_sidecar(res, made.provenance)
    except MedfuseError as e:
        res.error = _row_error_text(e, inputs, dataset=bool(s.folder))
        if e.__class__.__name__ == "CancelledError":
            res.status = "cancelled"
    except Exception as e:  # noqa: BLE001 - isolate the subject; the batch goes on
        res.error = _one_line(e)
    finally:  # also after the early returns (a skipped subject)
        if res.status != "done" and res.note and res.note.startswith("redone: "):
            res.note = _not_redone(res.note, Path(s.output))
        if labels and not keep and res.status in ("done", "skipped"):
            # Found beside the images (or listed in the manifest), never fused: said, not passed over.
            said = (f"label maps not fused: {', '.join(Path(x).name for x in labels)} (--keep-registered carries "
                    "them onto the fixed grid)")
            res.note = f"{res.note}; {said}" if res.note else said
    return inputs


def _register_only(s: Subject, res: SubjectResult, inputs: List[str], labels: Sequence[str], kw: Dict[str, Any],
                   series: Optional[List[str]], modalities: Optional[List[Optional[str]]],
                   options: Mapping[str, Any], cancel: Optional[CancelToken]) -> None:
    """Method ``none``: register and resample each moving image onto the fixed grid and write the kept files
    (:func:`_write_registered`), no fusion; any number of moving images.

    The fixed image re-saved (``<base>_<word>_fixed.nii.gz``) stands where the fused output would: its sidecar
    records the inputs and parameters (what makes a rerun skip the subject) and lists the other files. The row's
    ``output`` is that file.
    """
    import glob

    from .pipeline import Pipeline
    from .provenance import RESULTS_VERSION, is_medfuse_record, is_up_to_date, read_sidecar

    pipe = _registration_only(Pipeline(**{**kw, "method": "mean", "fallback": None}, series=series,
                                       modalities=modalities))
    params = pipe.parameters()
    out, base = _kept_base(s.output)
    overwrite = bool(options.get("overwrite"))
    expect = {"method_used": "none", "results_version": RESULTS_VERSION}
    # The fixed image's word comes from its modality as loaded: the earlier run's file is found by its sidecar.
    pattern = os.path.join(glob.escape(os.fspath(out.parent)), f"{glob.escape(base)}_*_fixed.nii.gz")
    # By hashes (is_up_to_date), never by the recorded paths: a sidecar's paths are scrubbed of patient identifiers.
    for found in sorted(glob.glob(pattern)):
        anchor = Path(found)
        rec = read_sidecar(anchor)
        if not is_medfuse_record(rec) or rec.get("method_used") != "none" \
                or len(rec.get("inputs") or []) != len(inputs):
            continue
        params = _suv_as_recorded(_unregistered_as_recorded(params, rec), rec, inputs)
        if is_up_to_date(anchor, input_paths=inputs, parameters=params, expect=expect) \
                and not _registered_stale(out, rec, inputs, labels, fused=False):
            _from_sidecar(res, rec)
            cell, res.outputs = _kept_outputs(out, anchor, rec, inputs, labels, fused=False)
            res.registered_outputs = ";".join(cell) or None
            res.status, res.output, res.note = "skipped", os.fspath(anchor), "; ".join(_label_notes(rec)) or None
            return
        res.note = "redone: inputs, parameters or registered images changed"  # medfuse's own files: replaced
    _make_output_folder(out)
    made, kept = _run_keeping(pipe, inputs, None, overwrite=False, cancel=cancel)
    cell, res.outputs, notes = _write_registered(out, inputs, made, kept, overwrite=overwrite, labels=labels,
                                                 parameters=params, fused=False)
    res.registered_outputs = ";".join(cell) or None
    res.status, res.output = "done", res.outputs.get("fixed")
    res.note = "; ".join([*([res.note] if res.note else []), *notes]) or None
    _from_sidecar(res, read_sidecar(Path(res.output)) if res.output else None)


#: File-name words of the moving images kept on the fixed grid (``keep_registered``), by modality.
_KEPT_WORDS = {"PT": "pet", "NM": "spect", "MR": "mr", "CT": "ct"}


def _kept_base(output: PathLike) -> Tuple[Path, str]:
    """The fused output's path and its name without its ending and a final ``_fused``: what kept files start with."""
    out = Path(os.fspath(output))
    base = _stem(out.name)
    return out, base[: -len("_fused")] if base.endswith("_fused") and len(base) > len("_fused") else base


def _input_word(path: str) -> Optional[str]:
    """The one modality word of :data:`_NAME_WORDS` that an input's file name holds as a whole word (``t1c`` of
    ``BraTS-GLI-00001-000-t1c.nii.gz``); None when none or several.

    Never the name itself: file and folder names hold patient names (``DOE_JANE_PET_1``), and kept names are
    quoted in reports and listings that are not scrubbed.
    """
    told = {w for w in _plain_words(Path(os.fspath(path)).name) if any(w in ws for ws in _NAME_WORDS.values())}
    return told.pop() if len(told) == 1 else None


def _kept_words(modalities: Sequence[Optional[str]], inputs: Optional[Sequence[str]] = None,
                fixed: Optional[str] = None) -> List[str]:
    """The word in each moving image's kept names: its modality's (``pet``); where several share one, each file's
    modality word (:func:`_input_word`: ``t1c``, ``t2w``) where that word is unique among the subject's inputs
    (``fixed`` included when given); else its position among the moving images (``pet1``, ``pet2``: the names of
    earlier versions, so their outputs keep their names)."""
    words = [_KEPT_WORDS.get(str(m).upper(), "moving") for m in modalities]
    by_position = [w if words.count(w) == 1 else f"{w}{k + 1}" for k, w in enumerate(words)]
    if inputs is None or len(inputs) != len(words):
        return by_position
    told = [_input_word(p) for p in inputs]
    every = told + ([_input_word(fixed)] if fixed is not None else [])
    named = [w if words.count(w) == 1 else t if t and every.count(t) == 1 else by
             for w, t, by in zip(words, told, by_position)]
    return named if len(set(named)) == len(named) else by_position


def registered_paths(output: PathLike, modalities: Sequence[Optional[str]],
                     inputs: Optional[Sequence[str]] = None, fixed: Optional[str] = None) -> List[Tuple[Path, Path]]:
    """Where ``keep_registered`` (``--keep-registered``) writes a subject's moving images on the fixed grid and their
    transforms: beside the fused output, named after it without its ending and a final ``_fused``
    (``out/sub-01_fused.nii.gz`` gives ``out/sub-01_pet_registered.nii.gz`` and ``out/sub-01_pet.tfm``).

    Args:
        output: the subject's fused output.
        modalities: each moving image's modality as loaded (``PT``, ``NM``, ``MR``, ``CT``; another or None:
            ``moving``).
        inputs: the moving images' files; where several share a modality, each is named after the modality word
            its file's name holds (``BraTS-...-t1c.nii.gz`` gives ``sub-01_t1c_registered.nii.gz``), where that word
            is unique among the subject's inputs. Otherwise (and without ``inputs``) their position among the
            moving images (``sub-01_pet1_registered.nii.gz``). Never other words of a file's name.
        fixed: the fixed image's file, whose word the moving images' words must differ from.

    Returns:
        ``(image, transform)`` per moving image; the transform file exists only where a registration ran.
    """
    out, base = _kept_base(output)
    return [(out.with_name(f"{base}_{w}_registered.nii.gz"), out.with_name(f"{base}_{w}.tfm"))
            for w in _kept_words(modalities, inputs, fixed)]


def _fixed_path(output: PathLike, modalities: Sequence[Optional[str]], inputs: Sequence[str]) -> Path:
    """Where the fixed image re-saved on its own grid goes: ``<base>_<word>_fixed.nii.gz``, the word its modality's
    (``mr``), or where another input shares that modality the modality word its file's name holds (``t1n``) if no
    other input's name holds it. ``modalities`` and ``inputs``: every input's, fixed first."""
    out, base = _kept_base(output)
    words = [_KEPT_WORDS.get(str(m).upper(), "moving") for m in modalities]
    told = [_input_word(p) for p in inputs]
    word = told[0] if words.count(words[0]) > 1 and told[0] and told.count(told[0]) == 1 else words[0]
    return out.with_name(f"{base}_{word}_fixed.nii.gz")


def _label_word(path: str) -> str:
    """The label word a label map's file name holds (the last of :data:`_LABEL_WORDS` in it: ``seg``, ``mask``);
    ``label`` for a manifest's label map whose name holds none. Never other words of the name (patient names)."""
    found = [w for w in _plain_words(Path(os.fspath(path)).name) if w in _LABEL_WORDS]
    return found[-1] if found else "label"


def _label_words(labels: Sequence[str]) -> List[str]:
    """Each label map's word in its kept name and in ``outputs["labels"]``: its label word (:func:`_label_word`),
    with its position among the subject's label maps where that word repeats (``seg1``, ``seg2``)."""
    words = [_label_word(x) for x in labels]
    return [w if words.count(w) == 1 else f"{w}{k + 1}" for k, w in enumerate(words)]


def _label_path(output: PathLike, word: str) -> Path:
    """Where a label map moved onto the fixed grid goes: ``<base>_<word>_label.nii.gz`` (:func:`_label_words`); its
    ending is no moving image's (``_registered.nii.gz``), so the two never share a name."""
    out, base = _kept_base(output)
    return out.with_name(f"{base}_{word}_label.nii.gz")


def _check_own_names(out: Path, inputs: Sequence[str], modalities: Sequence[Optional[str]],
                     labels: Sequence[str]) -> None:
    """Refuse, before any work, a subject whose kept files (fixed copy, moving images, transforms, label maps) would
    share a name, or land on its output or an input.

    Raises:
        InvalidInputError: two of them give one name.
    """
    paths = [out, _fixed_path(out, modalities, inputs)]
    paths += [p for pair in registered_paths(out, modalities[1:], inputs[1:], inputs[0]) for p in pair]
    paths += [_label_path(out, w) for w in _label_words(labels)]
    keys = [case_key(unicodedata.normalize("NFC", os.path.abspath(p))) for p in paths]
    given = {case_key(unicodedata.normalize("NFC", os.path.abspath(x))) for x in [*inputs, *labels]}
    clash = [p.name for p, k in zip(paths, keys) if keys.count(k) > 1 or k in given]
    if clash:
        raise InvalidInputError(f"the subject's kept files would share a name or land on an input: "
                                f"{', '.join(sorted(set(clash)))}",
                                fix="give the subject's output another name (the kept files are named after it)")


def _check_kept_names(subjects: Sequence["Subject"]) -> None:
    """``keep_registered``: no two subjects' kept images and transforms in one file, checked before any work.

    The names come from the fused output without its ending and a final ``_fused`` (:func:`registered_paths`), so
    ``out/a_fused.nii.gz`` and ``out/a.nii.gz`` would both keep ``out/a_pet_registered.nii.gz``: the second subject
    then wrote over the first's (a medfuse file, so not refused), and each rerun found the other's stale.

    Raises:
        InvalidInputError: two subjects' outputs give one name, naming both subjects (identifiers blanked).
    """
    from .provenance import patient_identifiers, scrub

    seen: Dict[str, "Subject"] = {}
    for s in subjects:
        kept = registered_paths(s.output, [None])[0][0]  # the modality word does not change a clash
        stem = kept.name[: -len("_moving_registered.nii.gz")]
        key = case_key(unicodedata.normalize("NFC", os.path.join(os.path.realpath(kept.parent), stem)))
        if key in seen:
            both = [seen[key], s]
            ids = patient_identifiers([x for b in both for x in (b.fixed, *b.moving, b.folder)
                                       if x and os.path.exists(x)])
            raise InvalidInputError(scrub(f"subjects {both[0].subject!r} and {s.subject!r} would keep their "
                                          f"registered images under one name ({stem}_<modality>_registered.nii.gz "
                                          f"in {_display_path(kept.parent)}): their outputs differ only by a final "
                                          "'_fused' or the ending", ids),
                                    fix="give the two subjects' outputs names that differ in more than '_fused' or "
                                        "the ending, or run without --keep-registered")
        seen[key] = s


def _grid_only(v: Any) -> Any:
    """A Volume with ``v``'s grid and no voxels of its own (a broadcast zero): to compare label maps' grids with."""
    import numpy as np

    from .volume import Volume

    return Volume(np.broadcast_to(np.zeros((), np.uint8), v.shape), v.affine)


class _KeepResampled:
    """The pipeline's resample step, keeping the moving images it put on the fixed grid: in their own units (a PET
    in SUV), before the normalise step scales them for the fusion; the fixed image as loaded; and every input's grid
    (for label maps). Its parameters are the step's own, so the pipeline's recorded parameters (what reruns compare)
    are unchanged."""

    def __init__(self, step: Any):
        self.step, self.params, self.kept, self.fixed, self.grids = step, getattr(step, "params", None), [], None, []

    def __call__(self, state: Any) -> Any:
        state = self.step(state)
        self.kept = list(state.volumes[1:])
        self.fixed = state.volumes[0]
        self.grids = [_grid_only(v) for v in state.originals]
        return state


class _NoFusion:
    """The fuse step of method ``none`` (registration only): the fixed image stands in for a fused one, which is
    never written."""

    params = {"method": "none"}

    def __call__(self, state: Any) -> Any:
        state.fused = state.volumes[0]
        return state


class _Unchanged:
    """A step left out (method ``none`` neither normalises nor saves a fused image)."""

    def __init__(self, params: Mapping[str, Any]):
        self.params = dict(params)

    def __call__(self, state: Any) -> Any:
        return state


def _registration_only(pipe: Any) -> Any:
    """``pipe`` (built with a classical method) as method ``none``: load, register and resample only."""
    return pipe.replace("normalise", _Unchanged({"method": "none"})).replace("fuse", _NoFusion()) \
        .replace("save", _Unchanged({}))


def _run_keeping(pipe: Any, inputs: Sequence[str], out: Optional[Path], *, overwrite: bool,
                 cancel: Optional[CancelToken]) -> Tuple[Any, "_KeepResampled"]:
    """Run ``pipe`` on ``inputs`` (writing ``out`` when given); returns its result and what it kept
    (:class:`_KeepResampled`: the moving images on the fixed grid in their own units, the fixed image, the grids)."""
    keep = _KeepResampled(pipe.step("resample"))
    made = pipe.replace("resample", keep).run(list(inputs), out, overwrite=overwrite, cancel=cancel)
    return made, keep


#: The sidecar key of a kept file that ties it to what it was made with: the fused output, or with method ``none``
#: the fixed image re-saved (which lists the kept files).
_TIED = {True: "fused_sha256", False: "fixed_output_sha256"}


def _listed(out: Path, entry: Any, key: str) -> Optional[Path]:
    """The kept file a sidecar's ``entry`` names under ``key`` (a bare file name beside ``out``); None when none."""
    name = entry.get(key) if isinstance(entry, Mapping) else None
    if not isinstance(name, str) or name in ("", ".", "..") or name != Path(name).name or "\\" in name:
        return None
    return out.with_name(name)


def _kept_outputs(out: Path, anchor: Path, rec: Optional[Mapping[str, Any]], inputs: Sequence[str],
                  labels: Sequence[str] = (), *, fused: bool) -> Tuple[List[str], Dict[str, Any]]:
    """What the sidecar ``rec`` of ``anchor`` (the fused output, or with method ``none`` the fixed image re-saved)
    lists as kept beside it: the report's ``registered_outputs`` (images and transforms, in order) and the
    subject's ``outputs`` mapping (:class:`SubjectResult`). ``labels``: the subject's label maps, in the order the
    sidecar lists them (a label map on the fixed grid is given by its own path, never the sidecar's scrubbed one)."""
    _, base = _kept_base(out)
    outputs: Dict[str, Any] = {"inputs": list(inputs), "fused": os.fspath(out) if fused else None}
    rec = rec if isinstance(rec, Mapping) else {}
    fixed = _listed(out, rec, "fixed_output") if fused else anchor
    if fixed is not None:
        outputs["fixed"] = os.fspath(fixed)
    cell: List[str] = []
    registered: Dict[str, str] = {}
    transforms: Dict[str, str] = {}
    kept = rec.get("registered_outputs")
    for k in kept if isinstance(kept, list) else []:
        image, tfm = _listed(out, k, "image"), _listed(out, k, "transform")
        if image is None:
            continue
        # The word between the base and the ending: ours (pet, t1c, pet1), never a file's other words.
        word = image.name[len(base) + 1: -len("_registered.nii.gz")] if image.name.startswith(f"{base}_") \
            else image.name
        registered[word] = os.fspath(image)
        cell.append(registered[word])
        if tfm is not None:
            transforms[word] = os.fspath(tfm)
            cell.append(transforms[word])
    found: Dict[str, str] = {}
    listed = rec.get("label_outputs")
    for j, k in enumerate(listed if isinstance(listed, list) else []):
        if not isinstance(k, Mapping) or k.get("on") not in ("fixed", "moving") or not isinstance(k.get("word"), str):
            continue
        image = _listed(out, k, "image")
        if image is not None:
            found[k["word"]] = os.fspath(image)
        elif j < len(labels):
            found[k["word"]] = labels[j]
    if kept is not None or fixed is not None:
        outputs.update(registered=registered, transforms=transforms, labels=found)
    return cell, outputs


def _label_notes(rec: Optional[Mapping[str, Any]]) -> List[str]:
    """The notes of label maps that were not carried (no input's grid, unreadable), from an anchor's sidecar."""
    listed = rec.get("label_outputs") if isinstance(rec, Mapping) else None
    return [k["note"] for k in listed or [] if isinstance(k, Mapping) and isinstance(k.get("note"), str)]


#: Why the kept files are written again when only the fixed image re-saved is missing (an earlier medfuse's
#: ``--keep-registered`` outputs): it alone is written, the registered images stay as they are.
_FIXED_ONLY = "fixed image re-saved missing"


def _registered_stale(out: Path, rec: Optional[Mapping[str, Any]], inputs: Sequence[str],
                      labels: Sequence[str] = (), *, fused: bool = True) -> Optional[str]:
    """Why the files kept beside the current fused output ``out`` (moving images on the fixed grid, their
    transforms, the fixed image re-saved, label maps moved) must be written again (``missing``, ``stale``,
    ``labels changed``, or :data:`_FIXED_ONLY` when all but the fixed image re-saved verify); None when each is
    there and its sidecar verifies it as made with this fused output, from these inputs, with its parameters. With
    ``fused`` False (method ``none``), ``rec`` is the sidecar of the fixed image re-saved, which the caller found
    current.

    The files are those the sidecar lists under their recorded names (an earlier version's names stay valid), and
    are checked by hashes, counts and order only: the paths a sidecar records are scrubbed of patient identifiers
    (``/data/[removed]_PET_1``), so they never equal the paths given.
    """
    from .provenance import RESULTS_VERSION, hash_path, is_up_to_date, read_sidecar

    recorded = rec.get("inputs") if isinstance(rec, Mapping) else None
    if not isinstance(recorded, list) or len(recorded) != len(inputs) or not isinstance(rec.get("output"), Mapping):
        return "missing"
    expect = {_TIED[fused]: rec["output"].get("sha256"), "results_version": RESULTS_VERSION}
    params = rec.get("parameters")
    kept = rec.get("registered_outputs")
    if not isinstance(kept, list) or len(kept) != len(inputs) - 1:
        return "missing"
    for i, k in enumerate(kept):
        image = _listed(out, k, "image")
        if image is None or not image.exists():
            return "missing"
        if not is_up_to_date(image, input_paths=[inputs[0], inputs[i + 1]], parameters=params, expect=expect):
            return "stale"
        transform = (read_sidecar(image) or {}).get("transform")
        if isinstance(transform, Mapping):
            tfm = _listed(out, k, "transform")
            try:
                if tfm is None or not tfm.is_file() or hash_path(tfm) != transform.get("sha256"):
                    return "missing" if tfm is None or not tfm.exists() else "stale"
            except MedfuseError:
                return "stale"
    listed = rec.get("label_outputs") or []
    if not isinstance(listed, list) or len(listed) != len(labels):
        return "labels changed"
    for k, lab in zip(listed, labels):
        try:
            sha = hash_path(lab)
        except MedfuseError:
            sha = None  # unreadable then and now: its note stands
        if not isinstance(k, Mapping) or sha != k.get("sha256"):
            return "labels changed"
        if k.get("image"):
            image, i = _listed(out, k, "image"), k.get("moving_index")
            if image is None or not image.exists():
                return "missing"
            if not isinstance(i, int) or not 0 <= i < len(inputs) - 1 or not is_up_to_date(
                    image, input_paths=[inputs[0], inputs[i + 1], lab], parameters=params, expect=expect):
                return "stale"
    if fused:
        fixed = _listed(out, rec, "fixed_output")
        if fixed is None or not is_up_to_date(fixed, input_paths=[inputs[0]], parameters=params, expect=expect):
            return _FIXED_ONLY
    return None


def _write_fixed_only(out: Path, rec: Mapping[str, Any], inputs: Sequence[str], pipe: Any, *, overwrite: bool,
                      labels: Sequence[str], cancel: Optional[CancelToken]) -> Tuple[List[str], Dict[str, Any]]:
    """Write only the fixed image re-saved beside a current fused output whose other kept files verify (an earlier
    medfuse's ``--keep-registered`` outputs, which had none), and list it in the output's sidecar: loaded by
    ``pipe`` (method ``none``, no registration: :func:`_registration_only`), so the registered images and their
    names stay as they are.

    Returns:
        The report's ``registered_outputs`` and the subject's ``outputs`` mapping.
    """
    from .provenance import write_sidecar

    _, keep = _run_keeping(pipe, inputs, None, overwrite=False, cancel=cancel)
    fixed_copy = _fixed_path(out, [keep.fixed.modality, *(v.modality for v in keep.kept)], inputs)
    _refuse_foreign([fixed_copy], overwrite)
    tied = {"fused_sha256": rec["output"].get("sha256"), "fused_output": out.name}
    _save_tied(_float32(keep.fixed), fixed_copy, [inputs[0]],
               dict(parameters=rec.get("parameters"), inputs=[_facts("fixed", inputs[0])], output=fixed_copy), tied)
    rec = {**rec, "fixed_output": fixed_copy.name}
    write_sidecar(out, rec, input_paths=[*inputs, *labels])
    return _kept_outputs(out, out, rec, inputs, labels, fused=True)


def _refuse_foreign(targets: Sequence[Optional[Path]], overwrite: bool) -> None:
    """Refuse to write a kept file where a file is that no medfuse sidecar verifies (unless ``overwrite``).

    Raises:
        OutputExistsError: such a file is at one of ``targets``.
    """
    from .provenance import is_medfuse_record, read_sidecar

    if overwrite or is_medfuse_record(read_sidecar(targets[0])):
        return
    for target in targets:
        if target is not None and (target.exists() or target.is_symlink()):
            raise OutputExistsError("a file is where a registered image or transform goes, and no medfuse "
                                    "sidecar verifies it", fix="rerun with --overwrite (overwrite=True) to "
                                    "replace it, or move it away", path=_display_path(target))


def _save_tied(vol: Any, image: Path, pair: Sequence[str], base: Dict[str, Any], extra: Dict[str, Any]) -> None:
    """Save a kept image with a sidecar tying it to its inputs ``pair`` and ``extra`` (what it was made with).

    The sidecar first: a run killed before the image is complete leaves medfuse's own, unverified file (made again on
    the next run), not one that only --overwrite may replace.
    """
    from .io import save
    from .io.writers import check_save_target
    from .provenance import build, hash_path, write_sidecar

    check_save_target(image, overwrite=True, inputs=pair)  # never onto an input
    write_sidecar(image, build(**base, extra=extra), input_paths=pair)
    save(vol, image, overwrite=True)
    write_sidecar(image, build(**base, output_sha256=hash_path(image), extra=extra), input_paths=pair)


def _float32(vol: Any) -> Any:
    """A kept image as float32, whatever its type as loaded or resampled (an SPM uint8 PET loaded as float64 was
    kept as float64, the others as float32): every channel of a subject in one type."""
    import numpy as np

    return vol if vol.array.dtype == np.float32 else vol.with_array(vol.array.astype(np.float32))


def _facts(role: str, path: str, modality: Optional[str] = None) -> Dict[str, Any]:
    from .provenance import hash_path

    return {"role": role, "path": path, "sha256": hash_path(path), **({"modality": modality} if modality else {})}


def _write_registered(out: Path, inputs: Sequence[str], made: Any, keep: "_KeepResampled", *, overwrite: bool,
                      labels: Sequence[str] = (), parameters: Optional[Mapping[str, Any]] = None,
                      fused: bool = True) -> Tuple[List[str], Dict[str, Any], List[str]]:
    """Write, beside the fused output ``out``, the moving images on the fixed grid (float32, in their own units) and
    their transforms, the fixed image re-saved on its own grid, and the label maps moved onto the fixed grid (nearest
    neighbour, integer type kept); each with a sidecar tying it to that output; and list them in the output's
    sidecar.

    With ``fused`` False (method ``none``: no fused output), the fixed image re-saved is written first, its sidecar
    records every input and ``parameters``, ties the others to it and lists them.

    Returns:
        The report's ``registered_outputs`` (images and transforms, in order), the subject's ``outputs`` mapping and
        the notes of label maps that were not carried.

    Raises:
        OutputExistsError: a file at one of their paths is not medfuse's (no medfuse sidecar), without
            ``overwrite``; or one is an input.
    """
    from . import load
    from .provenance import hash_path, read_sidecar, write_sidecar
    from .registration import resample

    moving_mods = [v.modality for v in keep.kept]
    modalities = [keep.fixed.modality, *moving_mods]
    _check_own_names(out, inputs, modalities, labels)
    fixed_copy = _fixed_path(out, modalities, inputs)
    paths = registered_paths(out, moving_mods, inputs[1:], inputs[0])
    words = _label_words(labels)
    # Which label maps are carried, and onto which paths, before anything is written: a foreign file at a label
    # map's path was refused only after the fixed copy and the registered images had been written.
    carried: List[Dict[str, Any]] = []
    moves: List[Tuple[Dict[str, Any], Any, int, Path]] = []
    for lab, word in zip(labels, words):
        entry: Dict[str, Any] = {"label": lab, "word": word, "sha256": None, "on": None, "moving_index": None,
                                 "image": None}
        carried.append(entry)
        name = Path(lab).name
        try:
            entry["sha256"] = hash_path(lab)
            vol = load(lab)
        except MedfuseError as e:
            entry["note"] = f"label map {name} not carried: {e.problem}"
            continue
        if vol.same_grid(keep.grids[0]):
            entry["on"] = "fixed"  # left as it is: it lies on the fixed grid already (a BraTS seg on all four)
            continue
        on_moving = [i for i, g in enumerate(keep.grids[1:]) if vol.same_grid(g)]
        if len(on_moving) != 1:
            why = "no input's grid" if not on_moving else "the grids of several moving images"
            entry["note"] = (f"label map {name} not carried: it lies on {why} (shape and affine), so which "
                             "transform moves it cannot be told")
            continue
        moves.append((entry, vol, on_moving[0], _label_path(out, word)))
    _refuse_foreign([fixed_copy], overwrite)
    for i, (image, tfm) in enumerate(paths):
        _refuse_foreign([image, tfm if i < len(made.transforms) and made.transforms[i] is not None else None],
                        overwrite)
    for _, _, _, image in moves:
        _refuse_foreign([image], overwrite)
    if fused:
        anchor = out
        rec = read_sidecar(out) or {}
        parameters = rec.get("parameters")
    else:
        anchor = fixed_copy
        facts = [_facts("fixed" if i == 0 else "moving", p, m) for i, (p, m) in enumerate(zip(inputs, modalities))]
        regs = [r for r in made.registrations if r is not None]
        _save_tied(_float32(keep.fixed), fixed_copy, list(inputs),
                   dict(inputs=facts, output=fixed_copy, parameters=parameters, registration=regs or None),
                   {"method_used": "none", "fused_output": None})
        rec = read_sidecar(fixed_copy) or {}
    tied = {_TIED[fused]: (rec.get("output") or {}).get("sha256"), "fused_output": out.name if fused else None}
    base = dict(parameters=parameters)
    if fused:
        _save_tied(_float32(keep.fixed), fixed_copy, [inputs[0]],
                   dict(base, inputs=[_facts("fixed", inputs[0])], output=fixed_copy), dict(tied))
    listed = []
    for i, ((image, tfm), vol) in enumerate(zip(paths, keep.kept)):
        pair = [inputs[0], inputs[i + 1]]
        transform = made.transforms[i] if i < len(made.transforms) else None
        reg = made.registrations[i] if i < len(made.registrations) else None
        extra = dict(tied)
        if transform is not None:  # as medfuse register writes it: fixed -> moving points, ITK
            from .io.writers import check_save_target

            check_save_target(image, overwrite=True, inputs=pair)
            transform.save(tfm, overwrite=True, inputs=pair)
            extra["transform"] = {"path": tfm.name, "sha256": hash_path(tfm)}
        facts = [_facts("fixed", pair[0]), _facts("moving", pair[1])]
        _save_tied(_float32(vol), image, pair,
                   dict(base, inputs=facts, output=image, registration=[reg] if reg is not None else None), extra)
        listed.append({"moving": pair[1], "image": image.name,
                       "transform": tfm.name if transform is not None else None})
    for entry, vol, i, image in moves:
        pair = [inputs[0], inputs[i + 1], entry["label"]]
        moved = resample(vol, keep.fixed, transform=made.transforms[i], interpolation="nearest")
        _save_tied(moved, image, pair, dict(base, inputs=[_facts("fixed", pair[0]), _facts("moving", pair[1]),
                                                         _facts("label", pair[2])], output=image), dict(tied))
        entry.update(on="moving", moving_index=i, image=image.name)
    notes = [e["note"] for e in carried if e.get("note")]
    kept = {"registered_outputs": listed, "label_outputs": carried}
    if fused:
        kept["fixed_output"] = fixed_copy.name
    if rec:  # the anchor's sidecar names them (its own hash and parameters are unchanged)
        write_sidecar(anchor, {**rec, **kept}, input_paths=[*inputs, *labels])
    cell, outputs = _kept_outputs(out, anchor, {**rec, **kept}, inputs, labels, fused=fused)
    return cell, outputs, notes


def _not_redone(note: str, out: Path) -> str:
    """The note of a stale output whose redo failed or was cancelled.

    Why: the row said "redone: inputs changed" while the old output, made from the old inputs, stayed in place
    with a sidecar that still verifies it (a classifier globbing ``*_fused.nii.gz`` took it up).
    """
    why = note[len("redone: "):]
    if out.exists():
        return f"not redone ({why}): the old output is still there and stale"
    return f"not redone ({why})"


def _refuse_own_input(output: str, inputs: Sequence[str]) -> None:
    """Refuse an output path that is one of the subject's own inputs (or inside its DICOM folder).

    Why: the row failed with "output exists and is not verified by its provenance sidecar... rerun with
    --overwrite", and --overwrite then failed with "refusing to write onto the volume's own source".

    Raises:
        OutputExistsError: the output is one of ``inputs``, or lies in one of them.
    """
    out = os.path.realpath(os.path.expanduser(output))
    for x in inputs:
        if not x:
            continue
        src = os.path.realpath(os.path.expanduser(x))
        if out == src or out.startswith(src.rstrip(os.sep) + os.sep):
            raise OutputExistsError("the output is the subject's own input"
                                    + ("" if out == src else " folder") + ": writing it would replace that input",
                                    fix="give the subject an output path of its own, away from its inputs",
                                    path=_display_path(output))


def _name_modalities(inputs: Sequence[str]) -> Optional[List[str]]:
    """For a dataset subject's images (fixed first): the modality each file's name tells, for the NIfTI/MetaImage/
    NRRD files whose own header states none; ``"-"`` (the image's own) for the others. None when no image needs one.

    Why: discovery paired ``t1.nii`` and ``pet.nii`` by their names and then fused both as ``unknown`` (the PET
    rule of the network never ran; up to 0.548 from ``medfuse fuse --modalities MR PT``). A DICOM series' own
    Modality, and a file that states its own (a medfuse tag, a BIDS sidecar), win.
    """
    from .io import is_image_file

    codes = []
    for p in inputs:
        kind = _modality_from_name(Path(p).name) if is_image_file(p) else None
        codes.append(kind if kind and _states_no_modality(p) else "-")
    return codes if any(c != "-" for c in codes) else None


def _states_no_modality(path: str) -> bool:
    """Whether the image file loads as ``unknown`` (its header, medfuse tag or BIDS sidecar names no modality).

    Read from the header alone, by the rules of medfuse's reader (NIfTI ``descrip`` tag, then the BIDS sidecar;
    MetaImage/NRRD ``medfuse_modality``): loading every voxel for it took 31 s of the 34 s of ``--write-manifest``
    over 1,000 small subjects (minutes at BraTS size). A file whose header cannot be read counts as stating none
    (the subject's run then says why).
    """
    from .io.nifti import ITK_SUFFIXES, _bids_sidecar, _itk_readable, _nib_load, _nibabel_notes, \
        _refuse_other_format, parse_tag
    from .io._c_locale import c_numeric_locale
    from .volume import normalise_modality

    p = Path(path)
    try:
        if p.stat().st_size == 0:
            return True
        gz = _refuse_other_format(p)
        if p.name.lower().endswith(ITK_SUFFIXES):
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetImageIO("NrrdImageIO" if p.name.lower().endswith((".nrrd", ".nhdr")) else "MetaImageIO")
            shown = sitk.ProcessObject.GetGlobalWarningDisplay()
            try:
                sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's own lines on stderr for a broken header
                with _itk_readable(p) as given, c_numeric_locale():
                    reader.SetFileName(given)
                    reader.ReadImageInformation()
            finally:
                sitk.ProcessObject.SetGlobalWarningDisplay(shown)
            key = "medfuse_modality"
            stated = reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else None
            shape = tuple(reader.GetSize()) if reader.GetNumberOfComponents() == 1 else (1, 1, 1, 2)
        else:
            with _nibabel_notes():  # a header nibabel repairs: the subject's own load says so
                hdr = _nib_load(p, gz).header  # the header only: nibabel reads the voxels when asked
            descrip = hdr["descrip"].item().decode("latin-1", "ignore") if "descrip" in hdr else ""
            stated = parse_tag(descrip)[0] or _bids_sidecar(p)[0]
            shape = tuple(int(n) for n in hdr.get_data_shape())
        if len(shape) > 3 and any(n != 1 for n in shape[3:]):
            return True  # several volumes (or colour): medfuse.load refuses it, as the subject's run will
        return normalise_modality(stated) == "unknown"
    except Exception:  # noqa: BLE001 - unreadable (nibabel and ITK raise many types), or a modality it does not know
        return True


#: Registration advice of fuse_files and register (``initialise='geometry'``, ``initial_transform=``,
#: ``register='rigid'``) names options that no batch row has: the steps a batch user can take instead.
_REGISTER_FIRST_FIX = ("check that the images belong together (same patient and anatomy); if they do, register this "
                       "subject on its own first: medfuse register FIXED MOVING --initialise geometry -o "
                       "MOVING_on_FIXED.nii.gz (check the result), then list that file as the subject's moving image "
                       "in a manifest row with register none")


def _row_error_text(e: MedfuseError, inputs: Sequence[str], *, dataset: bool = False) -> str:
    """A subject's error on one line for its report row: a fix a batch run can follow, and the file concerned first
    (as other row errors start) where the message tells which input it is.

    Args:
        e: the subject's error.
        inputs: the subject's images, fixed first (the pipeline's "input N" is ``inputs[N - 1]``).
        dataset: the subject came from a dataset folder (the fix says how to get a manifest to edit).
    """
    import re

    fix, path = e.fix, e.path
    if fix and "pass overwrite=True" in fix:  # an output that appeared meanwhile (another run writing it)
        fix = fix.replace("pass overwrite=True (--overwrite)", "pass overwrite=True") \
            .replace("pass overwrite=True", "rerun with --overwrite (overwrite=True)")  # the option named once
    if fix and ", or pass format='dicom'" in fix:  # a manifest picks the format by the output's name alone
        fix = fix.replace(", an existing series folder, or pass format='dicom'", " or an existing series folder")
    if fix and any(k in fix for k in ("initialise=", "initial_transform=", "register='")):
        fix = _REGISTER_FIRST_FIX + (" (medfuse batch DATASET --write-manifest writes one to edit)" if dataset else "")
    if fix and fix.startswith("pass volume_index=") and "4-D" in e.problem:
        # A manifest has no volume_index: the Python advice could not be followed in a batch.
        fix = ("save the volume you want as its own file (python -c \"import medfuse; medfuse.save(medfuse.load("
               "'FILE', volume_index=0), 'vol0.nii.gz')\") and name that file in the manifest"
               + (" (medfuse batch DATASET --write-manifest writes one to edit)" if dataset else ""))
    if path is None:
        n = re.match(r"input (\d+) ", e.problem)
        if n and 1 <= int(n.group(1)) <= len(inputs):
            path = _display_path(inputs[int(n.group(1)) - 1])
        elif "do not overlap" in e.problem and len(inputs) == 2:  # registration: the one moving image
            path = _display_path(inputs[1])
    elif os.fspath(path) != _display_path(path):  # as the row's output column quotes it (no "out/../x")
        path = _display_path(path)
    if fix is e.fix and path is e.path:
        return e.one_line()
    return MedfuseError(e.problem, fix=fix, path=path).one_line()  # formatted as every medfuse error


# ----------------------------------------------------------------------------- driver
def _identifiers_by_subject(subjects: Sequence[Subject]) -> Dict[str, Tuple[int, List[str]]]:
    """``{subject id: (its 1-based position, its patient identifiers)}``, read from each subject's readable DICOM
    inputs (its folder too, for a dataset subject not discovered yet)."""
    from .provenance import patient_identifiers

    out: Dict[str, Tuple[int, List[str]]] = {}
    for i, s in enumerate(subjects):
        paths = [p for p in (s.fixed, *s.moving, s.folder) if p and os.path.exists(p)]  # False where not allowed
        out[s.subject] = (i + 1, patient_identifiers(paths))
    return out


def _normal_path(value: Optional[str]) -> Optional[str]:
    """An absolute path normalised as :func:`_display_path` quotes it; a relative one (a list's output, written
    relative to the working folder) or an empty one as it is."""
    if not value or not os.path.isabs(os.path.expanduser(value)):
        return value
    return _display_path(value)


def _shown(res: SubjectResult, known: Mapping[str, Tuple[int, List[str]]]) -> SubjectResult:
    """``res`` as the report and summary show it: no subject id or path quoting the subject's own patient
    identifiers.

    A subject folder named after the patient (``DOE^JOHN/``) made its name the subject id and part of its output
    path. Such an id is shown blanked with the subject's position, ``[removed] #3``: unique and stable as long
    as the list of subjects is, and not derived from the name (a hash of a name can be reversed by guessing).
    """
    from dataclasses import replace

    from .provenance import scrub

    # Paths as messages quote them: the report showed a manifest's ../out/s.nii.gz as /d/ds/../out/s.nii.gz.
    res = replace(res, output=_normal_path(res.output),
                  **{a: ";".join(_normal_path(x) for x in getattr(res, a).split(";")) if getattr(res, a) else
                     getattr(res, a) for a in ("inputs", "registered_outputs")},
                  outputs=_paths_mapped(res.outputs, _normal_path))
    if res.warnings:  # with several threads a worker, a warning might land on another subject's row: every id
        res = replace(res, warnings=scrub(res.warnings, [i for _, found in known.values() for i in found]))
    row, ids = known.get(res.subject, (0, []))
    if not ids:
        return res
    subject = scrub(res.subject, ids)
    if subject != res.subject:
        subject = f"{subject} #{row}"
    return replace(res, subject=subject, **{a: scrub(getattr(res, a), ids)
                                            for a in ("output", "error", "inputs", "note", "registered_outputs")
                                            if getattr(res, a)},
                   outputs=_paths_mapped(res.outputs, lambda x: scrub(x, ids), keys=True))


def _is_batch_report(path: Path) -> bool:
    """True when ``path`` holds a report an earlier run wrote (its header or keys are ours)."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:  # only the header is ours: it is ASCII
            head = f.read(4096)
    except OSError:
        return False
    if path.suffix.lower() == ".json":
        return head.lstrip().startswith("[") and ('"subject"' in head or head.strip() == "[]")
    # Also as a spreadsheet saves it again in a ';' locale (with a byte-order mark and CRLF): it was "a file that
    # is not a medfuse batch report", and the run refused to start.
    return head.split("\n", 1)[0].startswith(("subject,status", "subject;status"))


def _check_report_path(path: Path, subjects: Sequence[Subject] = ()) -> None:
    """Refuse, before any work, a report path that holds someone else's file (a re-run's own is replaced), that
    is not .csv or .json, or that is a subject's input, output or output's sidecar (or lies inside one)."""
    from .provenance import sidecar_path

    if path.is_dir():
        raise InvalidInputError("the report path is a folder",
                                fix="pass report= (--report) a file path ending .csv or .json", path=path)
    if path.suffix.lower() not in (".csv", ".json"):
        # Any other ending got CSV text: "report.xlsx" that Excel would not open.
        raise InvalidInputError(f"the report path ends in {path.suffix or 'no ending'!r}; a batch report is .csv or "
                                ".json", fix="pass report= (--report) a path ending .csv or .json", path=path)
    here = case_key(os.path.realpath(path))
    for s in subjects:
        # The report written at an output's sidecar path took the place of that output's provenance.
        taken = [(s.output, "an output"), (sidecar_path(s.output), "an output's provenance sidecar")] + \
            [(x, "an input") for x in (s.fixed, *s.moving) if x]
        for target, what in taken:
            t = case_key(os.path.realpath(os.fspath(target)))
            if here == t or here.startswith(t.rstrip(os.sep) + os.sep):
                raise InvalidInputError(f"the report path is {what} of the batch (or inside one)",
                                        fix="pass report= (--report) a path of its own, e.g. beside the outputs' "
                                            "folder", path=path)
    if path.exists() and not _is_batch_report(path):
        raise OutputExistsError(
            "the report path holds a file that is not a medfuse batch report; it would be replaced",
            fix="move that file, or pass report= (--report) another path", path=path)


def _check_report_folder(path: Path, subjects: Sequence[Subject]) -> None:
    """Refuse, before any work, a report path given (``report=``, ``--report``) whose folder does not exist, unless
    the run makes that folder for its outputs (an output's folder, or one above it).

    Why: ``--report /nonexistent/dir/r.csv`` (a typo) silently created the missing folders, where ``medfuse fuse
    -o missing/x.nii.gz`` refuses. A default report's folder (the manifest's, ``--out``, the outputs') is not checked.

    Raises:
        OutputWriteError: the folder does not exist (``errno.ENOENT``).
    """
    folder = Path(_display_path(path)).parent
    if os.path.isdir(folder):
        return
    above = folder
    while not os.path.lexists(above) and above != above.parent:
        above = above.parent
    if not os.path.isdir(above):  # a file (or a broken link) in the way: the report's first write says so
        return
    if any(folder in Path(_display_path(s.output)).parents for s in subjects if not s.problem):
        return  # the outputs' folder, created for them anyway
    raise OutputWriteError("the report's folder does not exist; nothing was run", errno=errno.ENOENT,
                           fix="create the folder first, or pass report= (--report) a path in an existing folder "
                               "(or in the outputs' folder)", path=folder)


_COLUMNS = [f.name for f in fields(SubjectResult)]
#: The columns that a JSON report holds as lists (a CSV report as ``;``-joined text).
_LIST_COLUMNS = ("inputs", "registered_outputs")


def _report_text(path: Path) -> str:
    """A report's text: UTF-8 as medfuse writes it, or Windows-1252 as Excel's plain "CSV" saves it again.

    Why: a report re-saved by Excel (not as "CSV UTF-8") with a subject "Sujet_é" was "not a medfuse batch
    report", and the rerun refused to start.
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    if b"\r\n" not in raw and raw.startswith(b"subject,status"):
        # medfuse's own: a file name that is not UTF-8 is there as its bytes (read as cp1252, every UTF-8 row was
        # mangled, matched no subject, and was kept again as another row on each rerun)
        return raw.decode("utf-8", errors="surrogateescape")
    return raw.decode("cp1252", errors="replace")


def _read_report(path: Path) -> List[Dict[str, Any]]:
    """The rows of an earlier run's report at ``path`` (none when there is none or it is unreadable)."""
    if not path.is_file() or not _is_batch_report(path):
        return []
    try:
        text = _report_text(path)
        first = text.split("\n", 1)[0]
        rows = json.loads(text) if path.suffix.lower() == ".json" else list(
            csv.DictReader(text.splitlines(), delimiter=";" if first.startswith("subject;") else ","))
    except (OSError, ValueError, csv.Error):
        return []
    return [dict(r) for r in rows if isinstance(r, Mapping) and r.get("subject")]


def _row_lists(outputs: Any) -> Dict[str, List[str]]:
    """The ``inputs`` and ``registered_outputs`` lists of a row's ``outputs`` mapping (where it has them)."""
    if not isinstance(outputs, Mapping):
        return {}
    lists: Dict[str, List[str]] = {}
    if isinstance(outputs.get("inputs"), list):
        lists["inputs"] = list(outputs["inputs"])
    registered, transforms = outputs.get("registered"), outputs.get("transforms")
    if isinstance(registered, Mapping):
        tfms = transforms if isinstance(transforms, Mapping) else {}
        lists["registered_outputs"] = [p for w, image in registered.items() for p in (image, tfms.get(w)) if p]
    return lists


def _row_text(row: Any, json_format: bool) -> str:
    """One report row as the report's text holds it: a CSV line, or a JSON object indented as a list's item."""
    values = {c: getattr(row, c) for c in _COLUMNS} if isinstance(row, SubjectResult) else \
        {c: row.get(c) for c in _COLUMNS}
    if json_format:
        # Lists in JSON, from the row's own lists where it has them (split at ';', a path holding one was cut in
        # two); a row an earlier medfuse wrote holds only the ';'-joined text.
        lists = _row_lists(values.get("outputs"))
        for c in _LIST_COLUMNS:
            if c in lists and isinstance(values[c], str):
                values[c] = lists[c]
            elif isinstance(values[c], str):
                values[c] = values[c].split(";") if values[c] else []
        return "\n".join("  " + line for line in json.dumps(values, indent=2).split("\n"))
    import io

    if isinstance(values.get("outputs"), Mapping):  # a CSV cell holds the mapping as JSON text
        values["outputs"] = json.dumps(values["outputs"])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([values[c] for c in _COLUMNS])
    return buf.getvalue()


def _write_report(path: Path, results: Sequence[SubjectResult], earlier: Sequence[Mapping[str, Any]] = (),
                  texts: Optional[Dict[Tuple[bool, Any], Tuple[Any, str]]] = None, recover: bool = True) -> Path:
    """Write the report atomically: this run's rows, then the earlier report's rows of subjects not in this
    run (a run over some subjects keeps the others' rows). Columns in :class:`SubjectResult` order.

    Args:
        texts: a run's cache of rendered rows, by row (a row object seen before is not rendered again): the report
            is rewritten while the run goes on, and rendering every row each time (``asdict``, the CSV writer) made
            one rewrite of 3,000 rows take 1.2 s.
        recover: look for what killed writes left beside the report (:func:`medfuse.io._atomic.atomic_path`);
            ``False`` for a run's rewrites after its first report, under the report's run lock: each listed the
            folder twice, and the default report lies among the outputs (a dataset's 3,000 outputs and sidecars).
    """
    from .io._atomic import atomic_write_text

    json_format = path.suffix.lower() == ".json"
    texts = {} if texts is None else texts

    def text(row: Any, key: Tuple[bool, Any]) -> str:
        hit = texts.get(key)
        if hit is None or hit[0] is not row:
            hit = texts[key] = (row, _row_text(row, json_format))
        return hit[1]

    ours = {r.subject for r in results}
    parts = [text(r, (False, r.subject)) for r in results] + [text(r, (True, i)) for i, r in enumerate(earlier)
                                                              if r.get("subject") not in ours]
    if json_format:  # as json.dumps(rows, indent=2) writes the list
        body = "[\n" + ",\n".join(parts) + "\n]\n" if parts else "[]\n"
    else:
        body = ",".join(_COLUMNS) + "\n" + "".join(parts)
    return atomic_write_text(path, body, overwrite=True, recover=recover)


#: While a run goes on, its report is rewritten at most every this many seconds as subjects end (Dask runs; their
#: driver writes the last ones out while it waits), and then only where the last rewrite took under 1/20 of the time
#: since: a rewrite after every subject made a run of 3,000 subjects that fail at once spend 15 min on its report.
_REPORT_EVERY = 2.0
_REPORT_SHARE = 20


def _report_due(since: float, cost: float, every: float) -> bool:
    """Whether a run's report, last rewritten ``since`` seconds ago in ``cost`` seconds, is due to be rewritten.

    ``every`` is 0 for a synchronous run: its subjects run in this process, which cannot write the report while one
    runs, so the rows of those finished are written before the next starts (but where that would take over 1/20 of
    the run's time: many subjects that end at once, such as skipped ones).
    """
    return since >= max(every, _REPORT_SHARE * cost)


@contextmanager
def _report_lock(path: Path) -> Iterator[None]:
    """Hold the report's run lock (``.<report name>.lock`` beside it) for the length of a run.

    Two runs of one manifest at once (started twice, in two terminals or by a scheduler) computed every subject
    twice, and each reported the subjects the other finished first as ``failed: the output exists``: a report
    saying complete outputs failed. See :func:`medfuse._runlock.run_lock`.

    Raises:
        OutputExistsError: another run holds the lock.
    """
    def busy(holder: str) -> Exception:
        return OutputExistsError(f"another medfuse batch run is writing this report ({holder})",
                                 fix="wait for it to end (its subjects would be run twice), or pass report= "
                                     "(--report) another path", path=path)

    with run_lock(path.with_name(f".{path.name}.lock"), busy=busy):
        yield


def _first_report(path: Path, subjects: Sequence[Subject], earlier: Sequence[Mapping[str, Any]],
                  known: Optional[Mapping[str, Tuple[int, List[str]]]] = None) -> None:
    """Write the report before any work, as while the run goes on: this run's subjects ``pending``, the earlier
    report's other rows kept. A report that cannot be written (a read-only manifest folder) was only warned about
    when the run ended, maybe days later, with no report written meanwhile; now the run is refused at once.

    Raises:
        OutputExistsError: something is in the report's way (it appeared meanwhile, a name differing only in case).
        OutputWriteError: the report cannot be written there (permission, read-only or full disk, ...).
    """
    pending = [_shown(SubjectResult(subject=s.subject, status="pending", output=s.output), known or {})
               for s in subjects]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # a list's outputs' folder, absent until now
        _write_report(path, pending, earlier)
    except OSError as e:  # OutputExistsError/OutputWriteError (typed by the atomic writer) are OSErrors too
        # The system's reason ("Permission denied", "No space left on device"), found under the typed error.
        cause: Optional[BaseException] = e
        while cause is not None and not (isinstance(cause, OSError) and cause.errno):
            cause = cause.__cause__ or cause.__context__
        code = cause.errno if cause is not None else None
        if not isinstance(e, MedfuseError) and isinstance(e, (FileExistsError, NotADirectoryError)):
            code = errno.ENOTDIR  # mkdir met a file where the report's folder goes
        reason = os.strerror(code) if code else e.problem if isinstance(e, MedfuseError) else e.__class__.__name__
        # Only something in the report's way stays "exists"; a full disk or a forbidden folder is a write error.
        if isinstance(e, OutputExistsError):
            raise OutputExistsError(f"cannot write the batch report ({e.problem}); nothing was run",
                                    fix="pass report= (--report) another path", path=path) from None
        raise OutputWriteError(f"cannot write the batch report ({reason}); nothing was run", errno=code,
                               fix="pass report= (--report) a path in a folder you can write to", path=path) from None


def _check_scheduler(scheduler: str, workers: int) -> None:
    """What :func:`_client` would refuse, checked before the report is written or locked.

    Raises:
        InvalidInputError: an unknown scheduler (or not a str), or ``workers`` not a whole number of 1 or more
            (local scheduler).
        MissingDependencyError: Dask is not installed (any scheduler but ``synchronous``).
    """
    if isinstance(scheduler, str) and scheduler == "synchronous":
        return
    if not isinstance(scheduler, str) or (scheduler != "local"
                                          and not scheduler.startswith(("tcp://", "tls://", "inproc://", "ucx://"))):
        got = "a str that is none of them" if isinstance(scheduler, str) else describe(scheduler)
        raise InvalidInputError(f"unknown scheduler (got {got})",
                                fix="use 'local', 'synchronous' or a scheduler address such as tcp://host:8786")
    if scheduler == "local":
        whole(workers, "workers", example="workers=2 (--workers 2)", minimum=1, maximum=MAX_THREADS)
    import importlib.util

    if importlib.util.find_spec("dask") is None or importlib.util.find_spec("distributed") is None:
        raise MissingDependencyError.for_package("dask[distributed]", "medfuse batch", "batch")


@contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Ignore SIGINT in this process while the local cluster starts, so its nanny and worker processes inherit
    "ignore" (kept across fork and exec; Python installs its KeyboardInterrupt handler at startup only where
    SIGINT is at its default). The previous handler is restored afterwards.

    Why: Ctrl-C in a terminal signals the whole process group, and each worker and nanny printed its own
    KeyboardInterrupt/CancelledError traceback (~33 lines) under medfuse's "cancelling" message. This process
    handles the cancel: it drops the unfinished subjects and closes the cluster. A Ctrl-C during the seconds the
    cluster takes to start is ignored (press it again once it is up). Only in the main thread, where Python lets
    signal handlers be changed (elsewhere the workers behave as before). A worker started later, after one died,
    gets "ignore" from :func:`_ignore_sigint_in_every_worker` instead.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # SIGUSR1/2 too: a scheduler's notice before its time limit goes to the whole job, and workers killed by it
    # printed a dozen multiprocessing tracebacks; the medfuse command takes it as a cancel (medfuse.cli). Only
    # there: in a program calling run_batch, getsignal() says SIG_DFL for a handler set from C (faulthandler), and
    # restoring that wiped it out. Its workers still ignore them once they join (_ignore_sigint_in_every_worker).
    from . import cli

    usr = tuple(n for n in ("SIGUSR1", "SIGUSR2") if hasattr(signal, n)) if cli._CONSOLE[0] else ()
    names = ("SIGINT",) + usr
    old = {n: signal.getsignal(getattr(signal, n)) for n in names}
    for n in names:
        signal.signal(getattr(signal, n), signal.SIG_IGN)
    try:
        yield
    finally:
        for n in names:
            signal.signal(getattr(signal, n), old[n] if old[n] is not None else signal.SIG_DFL)


def _ignore_sigint_in_every_worker(client: Any) -> None:
    """Register a worker plugin that ignores SIGINT in every worker of the local cluster, one the nanny starts
    again after a worker died included.

    Why: the workers inherit "ignore" only while the cluster starts (:func:`_workers_ignore_sigint`). A worker
    restarted later (the one before it killed by the OOM killer, say) is spawned from this process once its own
    handler is back, and printed its KeyboardInterrupt traceback on Ctrl-C again. The scheduler hands a registered
    plugin to every worker that joins, before the worker takes a task; a restarted worker still has Python's
    handler for the second or so it takes to start and join.
    """
    from distributed import WorkerPlugin

    class IgnoreSigint(WorkerPlugin):
        def setup(self, worker: Any) -> None:
            import signal as sig
            import threading

            if threading.current_thread() is threading.main_thread():  # a worker's event loop runs there
                for name in ("SIGINT", "SIGUSR1", "SIGUSR2"):  # as _workers_ignore_sigint
                    if hasattr(sig, name):
                        sig.signal(getattr(sig, name), sig.SIG_IGN)

    client.register_plugin(IgnoreSigint(), name="medfuse-ignore-sigint")


#: The caller's values of the variables a local cluster's start changed (None: unset), put back when it closes.
_ENV_BEFORE_CLUSTER: Dict[str, Optional[str]] = {}


@contextmanager
def _environ_kept() -> Iterator[None]:
    """The variables the cluster's start changes in the caller's ``os.environ`` are put back on leaving, and again
    when the cluster closes (:func:`_restore_environ`): Dask's nanny sets its workers' variables in the parent
    before each spawn (OMP_NUM_THREADS=1, MKL_NUM_THREADS, OPENBLAS_NUM_THREADS, MALLOC_TRIM_THRESHOLD_...),
    also when it restarts a dead worker, and a service or notebook that ran a local batch kept them: its own
    NumPy and torch work ran on one thread after. Only those variables: others the caller sets meanwhile stay."""
    _ENV_BEFORE_CLUSTER.clear()  # this cluster's: an earlier batch's values are the caller's no longer
    saved = dict(os.environ)
    try:
        yield
    finally:
        changed = {n for n in set(os.environ) | set(saved) if os.environ.get(n) != saved.get(n)}
        for name in changed:
            _ENV_BEFORE_CLUSTER.setdefault(name, saved.get(name))
        _restore_environ()


def _restore_environ() -> None:
    """Put back the caller's values of the variables the local cluster's start had changed."""
    for name, value in _ENV_BEFORE_CLUSTER.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _client(scheduler: str, workers: int, threads: int):
    """Return (client, cluster_or_None)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise MissingDependencyError.for_package("dask[distributed]", "medfuse batch", "batch") from None
    if scheduler == "local":
        if workers < 1:
            raise InvalidInputError(f"--workers must be at least 1, got {workers}", fix="e.g. --workers 2")
        env = {var: str(threads) for var in THREAD_ENV_VARS}
        # Processes, one task each: ITK/NumPy work holds the GIL often enough that threads would not scale.
        # No dashboard: its periodic updates took ~10 % of a core (2-worker scaling 1.79x with it, 1.89x without).
        import dask

        try:
            # A subject whose worker dies (out of memory, a crash in a native library) fails at once: Dask's
            # default retries it on 3 more workers, each run as long and as large as the one that died.
            # Dask's own ERROR lines ("Task ... marked as failed because 1 workers died") are silenced: a dead
            # worker is reported per subject in medfuse's words, and a cancel (Ctrl-C, or SIGTERM sent to the
            # workers too, as SLURM does) printed them as if something had gone wrong.
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}), _workers_ignore_sigint(), \
                    _environ_kept():
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=logging.CRITICAL, env=env)
        except RuntimeError as e:
            fix = ("in a script, call run_batch under 'if __name__ == \"__main__\":' (workers are spawned processes "
                   "that re-import the script); or use scheduler='synchronous' (--scheduler synchronous); from the "
                   "command line, --debug shows the workers' own error")
            if cwd_gone():  # the workers start in the current folder: the advice above did not apply
                fix = ("the current folder no longer exists (deleted or moved while the shell was in it): cd to an "
                       "existing folder and run again")
            # Chained (not "from None"): --debug then shows the cause, which "Nanny failed to start" hides.
            raise MedfuseError(f"the local Dask cluster did not start ({' '.join(str(e).split())[:200]})",
                               fix=fix) from e
        client = Client(cluster)
        try:
            _ignore_sigint_in_every_worker(client)
        except BaseException:
            client.close()
            cluster.close()
            raise
        return client, cluster
    if not scheduler.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        raise InvalidInputError(f"unknown scheduler {scheduler!r}",
                                fix="use 'local', 'synchronous' or a scheduler address such as tcp://host:8786")
    try:
        return Client(scheduler, timeout="20s"), None
    except (OSError, TimeoutError) as e:
        raise MedfuseError(f"cannot reach the Dask scheduler at {scheduler} ({e.__class__.__name__})",
                           fix="start it with 'dask scheduler' and workers with 'dask worker ADDRESS', "
                               "or drop --scheduler to use a local cluster") from None


def _report_beside_outputs(subjects: Sequence[Subject]) -> Path:
    """``batch-report.csv`` in the common parent folder of the subjects' outputs (the default for a list).

    Raises:
        InvalidInputError: no subjects, or their outputs share no folder but the filesystem root (or none at all).
    """
    fix = "pass report= with the report's path (.csv or .json)"
    if not subjects:
        raise InvalidInputError("no subjects, so no outputs' folder to put the batch report in", fix=fix)
    # Relative outputs are relative to the working folder, as run_subject writes them.
    folders = [os.path.dirname(os.path.abspath(os.fspath(s.output))) for s in subjects]
    try:
        common = Path(os.path.commonpath(folders))
    except ValueError:  # different drives (Windows)
        common = None
    if common is None or common == Path(common.anchor):
        shown = " and ".join(sorted(set(folders))[:2])
        raise InvalidInputError(f"the subjects' outputs share no folder to put the batch report in ({shown})", fix=fix)
    return common / "batch-report.csv"


def _manifest_report(manifest: Path) -> Path:
    """A manifest's default report: ``<stem>-report.csv`` for a ``.csv`` manifest, ``<name>-report.csv`` for
    any other (``study.yaml`` gives ``study.yaml-report.csv``).

    The whole name for the others: ``study.csv`` and ``study.yaml`` side by side once shared
    ``study-report.csv``, the second run silently merging its rows into the first's (a subject both list lost
    its first row). CSV manifests keep the name every earlier run used, so a rerun still updates its report.
    """
    if manifest.suffix.lower() == ".csv":
        return manifest.with_name(manifest.stem + "-report.csv")
    return manifest.with_name(manifest.name + "-report.csv")


def _subjects_and_report(manifest: Union[PathLike, Sequence[Subject]], report: Optional[PathLike],
                         out_dir: Optional[PathLike]) -> Tuple[List[Subject], Path]:
    """The subjects of a manifest file, a dataset folder or a list, and the report's default path.

    Raises:
        InvalidInputError: ``manifest`` is neither a path nor a list of subjects (a subject is a :class:`Subject`
            or a dict of its fields), or ``report``/``out_dir`` is not a path; as :func:`read_manifest` and
            :func:`discover`.
    """
    what = "run_batch's manifest"
    fix = ("pass a manifest's path (.csv, .tsv, .yaml), a dataset folder, or a list of Subjects "
           "(read_manifest(...), discover(...))")
    if isinstance(manifest, (str, os.PathLike)):
        manifest = as_path(manifest, what=what, fix=fix, images=False)
    elif isinstance(manifest, (bytes, Mapping, Subject)) or hasattr(manifest, "shape") \
            or not hasattr(manifest, "__iter__"):
        # None or a number raised "'int' object is not iterable", an array "unhashable type"
        raise InvalidInputError(f"{what} must be a path or a list of subjects, got {describe(manifest)}", fix=fix)
    report = _optional_path(report, "report", "pass the report's path (.csv or .json) as a str or pathlib.Path, "
                                              "or None for the default")
    out_dir = _optional_path(out_dir, "out_dir", _OUT_DIR_FIX)
    if isinstance(manifest, Path) and manifest.is_dir():
        root = Path(_display_path(manifest))
        subjects = discover(root, out_dir=out_dir)
        _check_unique(subjects)  # folders sub-01 and SUB-01 would write one file on Windows and macOS
        out = _dataset_out_dir(root, out_dir)
        try:  # before any work: a read-only dataset needs out_dir (--out)
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _folder_error(e, out, "cannot create the outputs' folder",
                                fix="pass out_dir= (--out) a folder you can write to") from None
        _describe_derivatives(root, out)
        return subjects, Path(report) if report else out / "batch-report.csv"
    if out_dir is not None:
        raise InvalidInputError("out_dir applies to a dataset folder; a manifest names each output",
                                fix="drop out_dir, or point to the dataset folder")
    if isinstance(manifest, (str, os.PathLike)):
        mpath = Path(manifest)
        return read_manifest(mpath), Path(report) if report else _manifest_report(mpath)
    # A list of numbers or paths raised "dictionary update sequence" or "'int' object is not iterable".
    subjects = [_as_subject(s, caller="run_batch") for s in manifest]
    # As for a manifest: a subject listed twice made one report row hide the other (results are kept by subject),
    # and two outputs differing only in case are one file on Windows and macOS.
    _check_unique(subjects)
    return subjects, Path(report) if report else _report_beside_outputs(subjects)


def _usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _warn_oversubscribed(scheduler: str, workers: int, threads: int) -> None:
    """Warn when local workers x threads exceed the cores: they would slow each other down."""
    cores = _usable_cores()
    if scheduler == "local" and workers * threads > cores:
        import warnings

        from .errors import MedfuseWarning

        warnings.warn(f"{workers} workers x {threads} threads exceed this machine's {cores} cores; subjects will "
                      f"run slower, not faster (use --workers {max(1, cores // threads)})", MedfuseWarning,
                      stacklevel=3)


#: Seconds between two redraws of the batch's bar at least (as the command line's bars, ``cli._Bar``).
_BAR_INTERVAL = 0.5


def _batch_bar(total: int) -> Any:
    """The tqdm bar of a run's finished subjects on stderr, or None where the environment turns bars off
    (``MEDFUSE_NO_PROGRESS``, ``TQDM_DISABLE``, ``TERM=dumb``: :func:`medfuse.progress.text_bar_allowed`) or the
    bar cannot be built (a bad ``TQDM_*`` setting: no bar, never a failed run). Redrawn at most every
    :data:`_BAR_INTERVAL` seconds, in ``#`` blocks where stderr cannot show the Unicode ones.
    """
    from .progress import text_bar_allowed, text_bar_ascii

    if not text_bar_allowed():
        return None
    try:
        from tqdm import tqdm

        # disable=None hides the bar where stderr is no terminal (a cron log); a notebook's stderr is none
        # either, yet shows it: asked for there, it showed nothing at all.
        notebook = type(sys.stderr).__module__.startswith("ipykernel")
        return tqdm(total=total, desc="batch", unit="subject", file=sys.stderr, disable=False if notebook else None,
                    ascii=text_bar_ascii(sys.stderr), mininterval=_BAR_INTERVAL)
    except Exception:  # noqa: BLE001 - a broken bar must not stop the run
        return None


def run_batch(manifest: Union[PathLike, Sequence[Subject]], *, workers: Optional[int] = None, scheduler: str = "local",
              threads_per_worker: int = 1, register: Optional[str] = None, method: str = "network",
              device: str = "cpu", fallback: Optional[str] = None, overwrite: bool = False,
              report: Optional[PathLike] = None, progress: bool = False,
              cancel: Optional[CancelToken] = None, out_dir: Optional[PathLike] = None,
              suv: Optional[str] = None, keep_registered: bool = False) -> BatchSummary:
    """Fuse every subject of a manifest (or of a dataset folder) in parallel and write a report.

    Args:
        manifest: CSV/YAML path, a dataset folder holding one folder per subject (see :func:`discover`),
            or a list of :class:`Subject`.
        workers: local worker processes (``scheduler="local"``); default 2, or 1 where this process may use one
            core only (its CPU affinity: ``taskset``, a cluster job's allocation).
        scheduler: ``"local"``, ``"synchronous"`` (this process, no Dask) or a scheduler address.
        threads_per_worker: threads each worker's ITK/torch/BLAS may use.
        register, method, device, fallback: defaults for rows that do not set them. ``register`` ``"none"`` is
            ``None``. ``method="none"``: registration only, no fusion: each moving image (any number of them)
            registered and resampled onto the fixed grid and written as ``keep_registered`` writes it, the fixed
            image re-saved, no fused output (the nnU-Net/MONAI preprocessing recipe). With fusion, a subject of
            more than three images fails before any work.
        overwrite: redo subjects whose output exists but is not verified by its sidecar (outputs that
            their sidecar shows stale are redone anyway).
        report: report path (``.csv`` or ``.json``); default beside the manifest: ``<stem>-report.csv`` for
            a ``.csv`` manifest, ``<name>-report.csv`` for any other (``study.yaml-report.csv``, so that
            ``study.csv`` and ``study.yaml`` in one folder keep reports of their own); for a dataset folder
            ``batch-report.csv`` in ``out_dir``; for a list ``batch-report.csv`` in the folder holding the
            subjects' outputs (the common parent of their folders; relative outputs count from the working
            folder). Never the working folder just because it is one. Written before any work (a report that
            cannot be written stops the run at once), then every few seconds while subjects end (between
            subjects for ``scheduler="synchronous"``) and at the end; rows of subjects not in this run are kept.
            One run per report at a time: a second is refused while the first goes on.
        progress: show a tqdm bar of finished subjects (on a terminal, or in a Jupyter notebook; none under
            ``MEDFUSE_NO_PROGRESS``, ``TQDM_DISABLE`` or ``TERM=dumb``), redrawn at most twice a second.
        cancel: stop submitting/waiting; unfinished subjects are reported as cancelled.
        out_dir: a dataset folder's outputs' folder (default ``DATASET/derivatives/medfuse``).
        suv: how DICOM PET inputs are read, as :func:`medfuse.fuse_files` takes it (``None``: SUVbw).
        keep_registered: also write, beside each fused output, every moving image on the fixed grid in its own
            unit (a PET in SUV, float32) and its transform (see :func:`registered_paths`), the fixed image re-saved
            on its own grid (``<base>_<word>_fixed.nii.gz``, float32), and each subject's label maps on a moving
            image's grid moved onto the fixed grid by nearest neighbour (``<base>_<label word>_label.nii.gz``:
            ``seg``, ``mask``, numbered where it repeats, ``seg1``; integer type kept; one on the fixed grid is
            listed as it is, one on no input's grid gets a note). Names hold only words medfuse knows, never the
            rest of an input's file name (patient names). They all take part in the up-to-date checks and are
            listed in the report's ``outputs`` and the fused output's sidecar; the report's
            ``registered_outputs`` lists the moving images and transforms only. Outputs of an earlier version
            (no fixed copy) keep their names: only the fixed copy is added.

    Returns:
        :class:`BatchSummary`. Failures are in it, not raised.

    Raises:
        OutputExistsError: another run is writing the report, or something is in its way; checked before any work.
        OutputWriteError: the report cannot be written (permission, read-only or full disk, ...), or a ``report``
            given lies in a folder that does not exist (and is not the outputs'); checked before any work.
        InvalidInputError: ``manifest`` neither a path nor a list of subjects (each a :class:`Subject` or a dict of
            its fields), ``report`` or ``out_dir`` not a path, an unknown ``register``, ``method`` or
            ``scheduler`` or ``suv``, a ``fallback`` that is no classical method, ``workers`` or ``threads_per_worker`` not
            a whole number of 1 or more, ``cancel`` not a CancelToken, a list without ``report`` whose outputs
            share no folder but the filesystem root (or a different drive), an empty list without ``report``, a
            dataset folder without subject folders, an ``out_dir`` in a subject's folder, or a manifest
            :func:`read_manifest` refuses; checked before any work.
        UnreadableFileError: the manifest is missing or unreadable (as :func:`read_manifest`), or a dataset
            folder cannot be listed.
    """
    subjects, report_path = _subjects_and_report(manifest, report, out_dir)
    from .pipeline import _fusion_method

    # Defaults for every row that sets none: a typo must fail here, not once per subject.
    if isinstance(register, str) and register.strip().lower() == "none":
        register = None  # as the command line and a manifest's register column say it
    choice(register, "registration kind", _KINDS, fix="use None, 'none', 'rigid', 'affine' or 'deformable'")
    if isinstance(method, str) and method.strip().lower() == "none":
        method = "none"  # registration only: no fusion
    else:
        method = _fusion_method(method)
    if fallback is not None:
        _fusion_method(fallback, what="fallback method", classical=True)
    whole(threads_per_worker, "threads_per_worker", example="threads_per_worker=1 (--threads-per-worker 1)",
          minimum=1, maximum=MAX_THREADS)
    if suv is not None:
        from .io import _check_suv

        _check_suv(suv)
    check_callbacks(cancel=cancel)
    if keep_registered or method == "none" or any(s.method == "none" for s in subjects):
        _check_kept_names(subjects)
    _check_report_path(report_path, subjects)
    if report is not None and not (isinstance(report, str) and report == ""):  # a default's folder is made, as always
        _check_report_folder(report_path, subjects)
    if workers is None:
        # Not 2 on a one-core allocation (taskset, a SLURM job with one CPU): the run warned of oversubscription,
        # although the default was ours.
        workers = max(1, min(2, _usable_cores() // max(1, int(threads_per_worker))))
    _check_scheduler(scheduler, workers)  # a typo there must not rewrite the report with rows no run will finish
    absent = {s.subject: _absent_folders(s.output) for s in subjects}
    # One run per report at a time (two would run every subject twice and report each other's outputs as failed).
    with _report_lock(report_path):
        known = _identifiers_by_subject(subjects)
        hidden = {r: _shown(SubjectResult(subject=r, status=""), known).subject for r in known}
        # An earlier run's row under a subject id that is now blanked (written before ids were blanked) is
        # dropped, not kept beside the blanked row.
        earlier = [r for r in _read_report(report_path) if hidden.get(r.get("subject"), r.get("subject"))
                   == r.get("subject")]
        _first_report(report_path, subjects, earlier, known)  # an unwritable report stops the run before any work
        threads = int(threads_per_worker)
        asked = workers
        if scheduler == "local" and workers > len(subjects) >= 1:
            # One worker per subject at most: each spare one only costs seconds to start and memory
            # (1 subject on --workers 6: 13 s against 4.5 s on one worker).
            workers = len(subjects)
        _warn_oversubscribed(scheduler, workers, threads)
        from .io.dicom_writer import current_key

        # pseudonym_key: one for the whole run, held in memory only (its repr hides it; see using_key).
        options = dict(register=register, method=method, device=device, fallback=fallback, threads=threads,
                       overwrite=overwrite, suv=suv, pseudonym_key=current_key(),
                       keep_registered=bool(keep_registered))
        results: Dict[str, SubjectResult] = {}
        report_errors: List[BaseException] = []
        cancelled = False
        t0 = time.perf_counter()
        started = time.time()
        bar = _batch_bar(len(subjects)) if progress else None

        waiting = {s.subject: SubjectResult(subject=s.subject, status="pending", output=s.output) for s in subjects}
        shown: Dict[str, Tuple[SubjectResult, SubjectResult]] = {}  # {subject: (its result, as shown)}
        texts: Dict[Tuple[bool, Any], Tuple[Any, str]] = {}  # the report's rendered rows (_write_report)
        # Rewritten while the run goes on when due (_report_due): after every subject, every row rendered again, it
        # cost the run time growing as the square of its subjects (1,000 failing at once: 60 s; 3,000: 15 min).
        written_at = {"at": time.perf_counter(), "cost": 0.0, "dirty": False}
        every = 0.0 if scheduler == "synchronous" else _REPORT_EVERY  # synchronous: see _report_due

        def as_shown(raw: SubjectResult) -> SubjectResult:
            hit = shown.get(raw.subject)
            if hit is None or hit[0] is not raw:  # made once per result: _shown normalises every path
                hit = shown[raw.subject] = (raw, _shown(raw, known))
            return hit[1]

        def rows(unfinished: str, why: Optional[str]) -> List[SubjectResult]:
            return [as_shown(results.get(s.subject) or (waiting[s.subject] if unfinished == "pending" else
                                                        SubjectResult(subject=s.subject, status=unfinished,
                                                                      output=s.output, error=why,
                                                                      note=_left_in_place(s.output)
                                                                      if unfinished == "cancelled" else None)))
                    for s in subjects]

        def save_report(ordered: List[SubjectResult]) -> Optional[Path]:
            t = time.perf_counter()
            try:
                report_path.parent.mkdir(parents=True, exist_ok=True)  # a list's outputs' folder, absent until now
                # recover=False: _first_report cleaned up after any killed earlier run; under the lock no one else
                # writes here (positional, as the report's writer is called everywhere)
                return _write_report(report_path, ordered, earlier, texts, False)
            except (OSError, MedfuseError) as e:  # the work goes on; the summary is not lost over the report file
                report_errors.append(e)
                return None
            finally:
                now = time.perf_counter()
                written_at.update(at=now, cost=now - t, dirty=False)

        def save_if_due() -> None:
            if written_at["dirty"] and _report_due(time.perf_counter() - written_at["at"], written_at["cost"], every):
                save_report(rows("pending", None))

        def finished(d: Dict[str, Any]) -> None:
            results[d["subject"]] = SubjectResult(**d)
            written_at["dirty"] = True
            # A run killed overnight leaves a report of what it finished (but for its last seconds' subjects).
            save_if_due()
            if bar is not None:
                # Not refreshed here: update() redraws at most every _BAR_INTERVAL s (a burst of 3,000 ending
                # subjects redrew the line 3,000 times).
                bar.set_postfix_str(f"{as_shown(results[d['subject']]).subject}: {d['status']}", refresh=False)
                bar.update(1)

        finished.idle = save_if_due  # type: ignore[attr-defined]  # called by _run_on_dask while it waits

        n_workers = 1
        try:
            if scheduler == "synchronous":
                for s in subjects:
                    if cancel is not None and cancel.cancelled:
                        cancelled = True
                        break
                    # In the caller's own process: registration still uses `threads` (the pipeline sets it
                    # per call), but the process-wide pools are left alone.
                    finished(run_subject(s, {**options, "cap_process_threads": False}, cancel=cancel))
                    cancelled = cancelled or results[s.subject].status == "cancelled"
            else:
                n_workers, cancelled = _run_on_dask(subjects, options, scheduler, workers, finished, cancel)
        except KeyboardInterrupt:
            cancelled = True
        except Exception as e:
            # An error that ends the run (the scheduler went away, a cluster that did not start): no row may stay
            # 'pending' for good. The subjects not finished get their earlier row back, or say why they did not run.
            before = {r.get("subject") for r in earlier}
            save_report([_shown(results.get(s.subject) or SubjectResult(
                subject=s.subject, status="cancelled", output=s.output,
                error=f"not run: the batch stopped on an error ({e.__class__.__name__})",
                note=_left_in_place(s.output)), known)
                for s in subjects if s.subject in results or hidden[s.subject] not in before])
            raise
        finally:
            if bar is not None:
                bar.close()
        for s in subjects:
            # Also a subject whose worker was killed with the run (a group SIGTERM): it may have moved its output
            # into place before it died, its result lost.
            if s.subject not in results or (results[s.subject].status == "cancelled"
                                            and results[s.subject].error == _KILLED_WITH_THE_RUN):
                late = _finished_meanwhile(s, started) or _stopped_while_writing(s, started)
                if late is not None:
                    results[s.subject] = late
        if not cancelled or scheduler in ("local", "synchronous"):  # no worker may still be writing
            for s in subjects:
                if results.get(s.subject) is not None and results[s.subject].status == "failed":
                    _remove_empty(absent[s.subject])
        ordered = rows("cancelled", "not run: the batch was cancelled")
        wall = time.perf_counter() - t0
        written = save_report(ordered)
        if report_errors:
            import warnings

            from .errors import MedfuseWarning

            warnings.warn(f"could not write the batch report {report_path} ({report_errors[-1].__class__.__name__}); "
                          f"pass report= (--report) to choose another place", MedfuseWarning, stacklevel=2)
        return BatchSummary(results=ordered, report_path=written, wall_seconds=wall,
                            workers=n_workers if scheduler != "synchronous" else 1, cancelled=cancelled,
                            workers_asked=asked if scheduler == "local" and asked != workers else None,
                            scheduler=scheduler)


def _left_in_place(output: Any) -> Optional[str]:
    """The note of a subject the batch did not run while an earlier output of it is in place, else None.

    Why: the row said only "not run: the batch was cancelled", and the earlier output (of other options, say)
    stayed in place as if it were this run's. Not checked here: that would hash every input on the way out.
    """
    try:
        there = os.path.exists(_display_path(output))
    except (TypeError, ValueError, OSError):
        return None
    return ("an earlier output is still there, not checked against this run's inputs and options (it may be "
            "stale): rerun to bring it up to date") if there else None


def _absent_folders(output: Any) -> List[Path]:
    """The folders of ``output``'s path that do not exist yet, deepest first (those its run will create)."""
    try:
        folder = Path(_display_path(output)).parent  # where the file system puts it (a link before a ".." too)
    except (TypeError, ValueError):
        return []
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove those of ``folders`` (deepest first) that are empty: a failed subject's run left its output's new
    folder behind, empty. A folder anything went into since (another subject's output) stays."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, gone, or not ours to remove: the folders above stay too
            return


def _finished_meanwhile(s: Subject, since: float) -> Optional[SubjectResult]:
    """The result of a subject a worker finished while the run was being cancelled (its result never came
    back): an output written since ``since`` that its sidecar verifies; else None."""
    from .provenance import hash_path, read_sidecar

    out = Path(s.output)
    try:
        if not out.exists() or out.stat().st_mtime < since:
            return None
        rec = read_sidecar(out)
        if not isinstance(rec, Mapping) or (rec.get("output") or {}).get("sha256") != hash_path(out):
            return None
    except (OSError, MedfuseError):
        return None
    res = SubjectResult(subject=s.subject, status="done", output=s.output, note="finished while cancelling")
    _from_sidecar(res, rec)
    return res


def _stopped_while_writing(s: Subject, since: float) -> Optional[SubjectResult]:
    """The row of a subject a worker was writing when the run was cancelled (its sidecar, marked in progress since
    ``since``, says so); else None.

    Why: the row said "not run: the batch was cancelled" while its worker had run it and was stopped mid-write,
    leaving its temporary files (the next run cleans them up and redoes it).
    """
    from .provenance import read_sidecar, sidecar_path

    try:
        side = sidecar_path(s.output)
        if not side.is_file() or side.stat().st_mtime < since:
            return None
        rec = read_sidecar(s.output)
    except (OSError, MedfuseError):
        return None
    if not isinstance(rec, Mapping) or (rec.get("output") or {}).get("in_progress") is not True:
        return None
    return SubjectResult(subject=s.subject, status="cancelled", output=s.output,
                         error="stopped while its output was being written: the batch was cancelled",
                         note="the next run of this batch puts back the earlier output, if any, and redoes it")


def _worker_died(e: BaseException) -> str:
    """The report's words for a subject whose worker process died under it."""
    if e.__class__.__name__ == "KilledWorker":
        return ("the worker process running it died (most often out of memory; else a crash in a native library). "
                "Fix: run it again with fewer workers (--workers 1) or on a machine with more memory")
    return f"the worker running it failed ({_one_line(e)})"


#: The error of a subject whose worker died while the run was being cancelled; the run's end still looks for the
#: output it may have completed first (``_finished_meanwhile``).
_KILLED_WITH_THE_RUN = "stopped while it ran: the batch was cancelled"


class _RunStop(CancelToken):
    """The cancel of a run on a remote Dask cluster, as a subject's :class:`CancelToken`: a ``distributed.Event``
    named by the run, read on the scheduler at most once a second.

    Why: the run's stop file lives on the driver's disk, which workers on other machines (``tcp://``) never see,
    and closing the client does not stop a task already running there: a subject cancelled by Ctrl-C went on and
    moved its output into place after the report said "stopped while it ran". Now it stops at the pipeline's next
    check (its output is not written). A scheduler that cannot be asked counts as not cancelled.
    """

    _EVERY_S = 1.0

    def __init__(self, name: str) -> None:
        super().__init__()
        self._asked = -float("inf")
        self._run_event: Any = None
        try:
            from distributed import Event, get_client

            # Bound now, on the worker: once the run's client cancels the task, the thread running it can no
            # longer find the worker's client by itself.
            self._run_event = Event(name, client=get_client())
        except Exception:  # noqa: BLE001 - not on a Dask worker: only cancel() stops it
            pass

    @property
    def cancelled(self) -> bool:
        if (self._run_event is not None and not self._event.is_set()
                and time.monotonic() - self._asked >= self._EVERY_S):
            self._asked = time.monotonic()
            with contextlib.suppress(Exception):  # the scheduler is gone: go on
                if self._run_event.is_set():
                    self._event.set()
        return self._event.is_set()

    def raise_if_cancelled(self, what: str = "the operation") -> None:
        if self.cancelled:
            super().raise_if_cancelled(what)


def _run_event(client: Any, scheduler: str, tag: str) -> Tuple[Optional[str], Any]:
    """(name, Event) of a run's cancel on a remote cluster; (None, None) on the local one (its workers are stopped
    with it) or where the cluster cannot hold one."""
    if scheduler == "local":
        return None, None
    name = f"medfuse-stop-{tag}"
    try:
        from distributed import Event

        return name, Event(name, client=client)
    except Exception:  # noqa: BLE001 - an older or odd cluster: the stop file still stops subjects not started
        return None, None


def _dask_result(value: Any, s: Subject, cancel: Optional[CancelToken]) -> Dict[str, Any]:
    """The result dict of a subject's ended Dask task from what ``as_completed(with_results=True)`` gave: the
    task's dict, or the error of a worker that died under it (a failed row, or a cancelled one while the run is
    being cancelled).

    Why cancelled: a SIGTERM to the whole process group (a job's time limit, ``timeout``) kills the workers too, and
    their subjects read "the worker process running it died (most often out of memory ...)", which sent users to
    ``--workers 1`` for nothing.
    """
    if isinstance(value, Mapping):
        return dict(value)
    e = value[1] if isinstance(value, tuple) and len(value) == 3 else value  # distributed's (type, error, traceback)
    if cancel is not None and cancel.cancelled:
        return asdict(SubjectResult(subject=s.subject, status="cancelled", output=s.output,
                                    error=_KILLED_WITH_THE_RUN))
    return asdict(SubjectResult(subject=s.subject, status="failed", output=s.output,
                                error=_worker_died(e if isinstance(e, BaseException) else Exception(str(e)))))


def _run_on_dask(subjects: Sequence[Subject], options: Mapping[str, Any], scheduler: str, workers: int,
                 finished, cancel: Optional[CancelToken], task=run_subject) -> Tuple[int, bool]:
    """Run the subjects on a Dask cluster, calling ``finished(result_dict)`` as each ends; returns
    (number of workers, cancelled). ``cancel`` is polled while waiting and between the results that came in
    together, so Ctrl-C is answered at once rather than when the next subject ends; unfinished subjects are dropped
    with the local cluster. ``finished.idle()``, where it has one, is called while waiting (the report's rewrite).

    Why so: 3,000 subjects failing at once came back in batches of hundreds, each one's row written, and a SIGTERM
    was acted on 10 minutes later. Results come with their futures (``with_results``): ``future.result()`` waits
    for Dask's event loop, which a SIGTERM to the whole process group kept busy for seconds while the nannies
    started new workers in place of the killed ones, and those ran hundreds of subjects meanwhile. Once cancelled,
    a task that starts anyway (on such a new worker, before Dask has dropped it) finds the run's stop file and
    returns at once (:func:`run_subject`).
    """
    try:
        client, cluster = _client(scheduler, workers, options["threads"])
    except MedfuseError:
        if cancel is not None and cancel.cancelled:
            # A SIGTERM (a scheduler's time limit, sent to the whole process group) while the workers started
            # killed them, and the run ended as "the cluster did not start" with exit 2 and the __main__ advice.
            return 1, True
        raise
    import shutil
    import tempfile

    idle = getattr(finished, "idle", None)
    cancelled = interrupted = False
    stop_dir = tempfile.mkdtemp(prefix="medfuse-batch-")
    stop = os.path.join(stop_dir, "cancelled")
    try:
        from dask.distributed import as_completed

        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        tag = uuid.uuid4().hex[:8]
        event_name, event = _run_event(client, scheduler, tag)
        task_options = {**options, "stop_file": stop, **({"stop_event": event_name} if event_name else {})}
        futures = {client.submit(task, asdict(s), task_options, key=f"medfuse-{tag}-{i}",
                                 pure=False): s for i, s in enumerate(subjects)}
        pending = as_completed(list(futures), with_results=True, raise_errors=False)

        def stop_all() -> None:
            """Tell every task of the run to stop: those starting (the stop file) and, on a remote cluster, those
            running (the event)."""
            with contextlib.suppress(OSError):
                open(stop, "w").close()
            if event is not None:
                with contextlib.suppress(Exception):
                    event.set()

        def report(batch: List[Any]) -> bool:
            """Record a batch of ended subjects; False once cancelled (the rest of it is still recorded)."""
            for fut, value in batch:
                if fut.status == "cancelled" and cancel is not None and cancel.cancelled:
                    continue  # dropped by our cancel before it ran: reported as not run at the run's end
                # Cancelled by Dask itself (the scheduler's connection lost): a failed row, not "the batch was
                # cancelled", which nobody did.
                if cancel is not None and cancel.cancelled and not os.path.exists(stop):
                    stop_all()  # first thing: a task starting from now on does nothing
                finished(_dask_result(value, futures[fut], cancel))
            return not (cancel is not None and cancel.cancelled)

        while not pending.is_empty():
            if cancel is not None and cancel.cancelled:
                cancelled = True
                break
            if not pending.has_ready():
                if idle is not None:
                    idle()
                time.sleep(0.2)
                continue
            if not report(pending.next_batch(block=False)):
                cancelled = True
                break
        if cancelled:
            stop_all()
            client.cancel([f for f in futures if not f.done()])
            report(pending.next_batch(block=False) if not pending.is_empty() else [])  # those ended meanwhile
    except KeyboardInterrupt:  # the second Ctrl-C (the CLI's first only cancels): stop now
        interrupted = True
        raise
    finally:
        try:
            _close(client, cluster, kill=interrupted)
        finally:
            shutil.rmtree(stop_dir, ignore_errors=True)
    return n_workers, cancelled


def _close(client: Any, cluster: Any, *, kill: bool = False) -> None:
    """Close the client and the local cluster; on a Ctrl-C (``kill``, or one while closing) the local workers are
    killed first, so that it stops at once.

    Why: the second Ctrl-C broke out of ``client.close()``, so the cluster was closed only when Python exited,
    ~10 s later. Meanwhile its workers went on and moved complete outputs into place 0.1-1.6 s after the report
    said "cancelled, not run" (and raw "terminate called without an active exception" lines appeared). Once this
    returns (or raises), no local worker writes anything more, so the report made next tells the truth.

    Raises:
        KeyboardInterrupt: a Ctrl-C while closing, once the workers are stopped.
    """
    try:
        if kill and cluster is not None:
            _kill_workers(cluster)
        client.close()
        if cluster is not None:
            cluster.close()
    except KeyboardInterrupt:
        if cluster is not None:
            _kill_workers(cluster)
            with contextlib.suppress(BaseException):  # a third Ctrl-C, or a cluster upset by its dead workers
                cluster.close(timeout=5)
        raise
    finally:
        if cluster is not None:  # a worker restarted meanwhile set them again
            _restore_environ()


def _kill_workers(cluster: Any) -> None:
    """Kill the local cluster's worker processes (SIGKILL): a subject's work stops where it is; its output, written
    atomically, is either complete and in place or not there (a temporary file left behind is removed by the next
    write to that output)."""
    kill = getattr(signal, "SIGKILL", signal.SIGTERM)
    for nanny in list(getattr(cluster, "workers", {}).values()):
        pid = getattr(nanny, "pid", None)  # a Nanny's worker process (None once it is gone)
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, kill)


# ----------------------------------------------------------------------------- phantom subjects
def write_phantom_subjects(folder: PathLike, n: int, *, first_seed: int = 1, lesion: Union[bool, Sequence[bool]] = True,
                           downsample: int = 2, register: Optional[str] = "rigid",
                           method: Optional[str] = None) -> Path:
    """Write ``n`` synthetic subjects (MR T1 + PET NIfTI, from :mod:`medfuse.phantom`) and a ``manifest.csv``.

    Handy to try ``medfuse batch`` and for tests and benchmarks. The MR is block-averaged by ``downsample``
    (2 -> 2 mm) to keep runs short.

    Args:
        folder: where to write (created if needed); each subject gets ``folder/sub-NN/``.
        n: how many subjects (1 or more).
        first_seed: the phantom seed of the first subject (the next ones count up from it).
        lesion: whether the phantoms have a lesion: one value for all, or one per subject.
        downsample: the MR's block-averaging factor (1: the phantom's 1 mm grid).
        register: the manifest's ``register`` column (``None``: ``none``).
        method: the manifest's ``method`` column (``None``: no column, the batch's method).

    Returns:
        The manifest's path (``folder/manifest.csv``), with outputs under ``folder/out/``.

    Raises:
        InvalidInputError: ``n`` or ``downsample`` not a whole number of 1 or more, ``first_seed`` negative or a
            fraction, a ``lesion`` sequence whose length is not ``n``, or a per-subject ``lesion`` not True or
            False.
        OutputExistsError: a folder is where a sample file goes.
        OutputWriteError: a folder or file cannot be written (permission, read-only or full disk, a file in the
            way of a folder).
    """
    import numpy as np

    from .io import save
    from .phantom import make_phantom

    n = whole(n, "n", minimum=1, example="n=4 subjects")
    lesions = list(lesion) if isinstance(lesion, (list, tuple)) else [bool(lesion)] * n
    if len(lesions) != n:
        raise InvalidInputError(f"lesion gives {len(lesions)} values for {n} subjects",
                                fix="pass one True/False for all subjects, or one per subject")
    downsample = whole(downsample, "downsample", minimum=1, example="downsample=2 (half the resolution)")
    root = Path(folder)
    rows = []
    for i in range(n):
        sid = f"sub-{i + 1:02d}"
        sdir = root / sid
        _make_output_folder(sdir / "mr_t1.nii.gz")
        ph = make_phantom(seed=first_seed + i, lesion=lesions[i])
        t1 = ph.t1
        if downsample > 1:
            f = downsample
            a = np.asarray(t1.array, dtype=np.float32)
            shp = [s // f * f for s in a.shape]
            a = a[: shp[0], : shp[1], : shp[2]].reshape(shp[0] // f, f, shp[1] // f, f, shp[2] // f, f).mean(axis=(1, 3, 5))
            aff = t1.affine.copy()
            aff[:3, :3] = t1.affine[:3, :3] * f
            aff[:3, 3] = t1.index_to_world(np.full(3, (f - 1) / 2.0))
            from .volume import Volume

            t1 = Volume(a.astype(np.float32), aff, modality="MR", unit="arbitrary")
        save(t1, sdir / "mr_t1.nii.gz", overwrite=True)
        save(ph.pet, sdir / "pet.nii.gz", overwrite=True)
        rows.append({"subject": sid, "fixed": f"{sid}/mr_t1.nii.gz", "moving": f"{sid}/pet.nii.gz",
                     "output": f"out/{sid}_fused.nii.gz", "register": register or "none",
                     **({"method": method} if method else {})})
    from .io._atomic import atomic_write_text
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    manifest = root / "manifest.csv"
    atomic_write_text(manifest, buf.getvalue(), overwrite=True)
    return manifest
