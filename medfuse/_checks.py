"""Small argument checks and slab-wise array scans shared by the loaders, writers, provenance and fusion.

Private: the public functions call these so that a wrong argument gets one wording everywhere, and a scan of a
whole volume never makes a volume-sized temporary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from .errors import InvalidInputError


#: The most threads (or worker processes) an option may ask for. Why: a count beyond ITK's unsigned int failed
#: with SWIG's OverflowError ("internal error" in the CLI); no machine medfuse runs on has more cores than this.
MAX_THREADS = 1024


def describe(value: Any) -> str:
    """A wrong value described by its type (never its contents: a path or a header may identify a patient)."""
    from .volume import Volume

    if value is None:
        return "None"
    if isinstance(value, Volume):
        return "a medfuse Volume"
    if isinstance(value, type):  # a class given for a value (medfuse.Volume itself): its .shape is a property
        return f"the class {value.__name__}"
    name = type(value).__name__
    if name == "Volume" and type(value).__module__ == "medfuse.volume":
        # A Volume made before importlib.reload(medfuse.volume) (a notebook): "expected a medfuse Volume, got
        # Volume" contradicted itself.
        return "a medfuse Volume made before medfuse was reloaded (load it again, or restart the kernel)"
    article = "an" if name[:1].lower() in "aeio" or name.startswith("nd") else "a"  # an int, an ndarray; a uint8
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{article} {name} of shape {tuple(value.shape)}"
    return f"{article} {name}"


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


def as_path(value: Any, *, what: str = "path", fix: Optional[str] = None, images: bool = True) -> Path:
    """``value`` as a Path, or a typed error saying what to pass.

    Why: ``Path(None)`` raises pathlib's bare TypeError, and ``Path("")`` is the working folder, which a reader
    would then search for DICOM files.

    ``images=False`` is for paths that do not name an image (a manifest, a report, weights): ``fix`` is then
    given for every wrong value, not the hints about loading images that a Volume, a list or an array get.

    Raises:
        InvalidInputError: not a str or os.PathLike naming a str, an empty string, or one no file system name can
            hold (an unpaired surrogate).
    """
    try:
        text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    except TypeError:
        text = None
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} must be a file path (or a folder's: a str or pathlib.Path), got "
                                f"{describe(value)}", fix=_path_fix(value, fix) if images or not fix else fix)
    if not text.strip():
        raise InvalidInputError(f"{what} is an empty string",
                                fix=fix if fix and not images else "give the file or folder's path")
    try:
        os.fsencode(text)
    except UnicodeError:
        # A lone surrogate ("\ud800", from a bad decoding) no file system name can hold: a raw UnicodeEncodeError.
        raise InvalidInputError(f"{what} holds a character no file name can hold (an unpaired surrogate, "
                                "left by a text decoded with the wrong encoding)",
                                fix="decode the name correctly, or choose another") from None
    return Path(text)


def cwd_gone() -> bool:
    """Whether the current folder no longer exists (deleted or moved while a shell was in it): relative paths
    then fail with a bare "no such file", naming none."""
    try:
        os.getcwd()
        return False
    except FileNotFoundError:
        return True


def is_or_above(real: str, top: str) -> bool:
    """Whether the real folder ``real`` is ``top`` itself or one of the folders above it: a link there would walk
    the whole dataset, or the whole disk."""
    return top == real or top.startswith(real.rstrip(os.sep) + os.sep)


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


def constant_value(x: np.ndarray, elements: int = 1 << 22) -> Optional[float]:
    """The one value every element of a non-empty ``x`` holds, or None when it holds two or more.

    A sparse sample first: an image differs there at once, so a whole pass (slab by slab, no volume-sized
    temporary) is made only for a nearly flat one.
    """
    # x.flat: a sample of any memory layout without a copy of the whole (reshape copies a transposed array).
    first = x.flat[0]
    if np.any(x.flat[::4099] != first):
        return None
    if x.ndim == 0 or all(bool(np.all(x[s] == first)) for s in slab_slices(x, elements)):
        return float(first)
    return None


def as_list(value: Any, *, problem: str, fix: str) -> list:
    """``value`` (any iterable of items: a list, tuple or generator) as a new list, or a typed error.

    Why: ``len(None)`` and ``len(5)`` are bare TypeErrors, a str would be taken apart into letters, a dict into
    its keys, an array or a Volume into slices, and a generator used up by a first pass.

    Raises:
        InvalidInputError: None, a str or bytes, a mapping, an array-like (anything with a ``shape``) or a
            non-iterable; the message is ``problem`` with the value described by its type.
    """
    if isinstance(value, (str, bytes, Mapping)) or hasattr(value, "shape") or not isinstance(value, Iterable):
        raise InvalidInputError(f"{problem}, got {describe(value)}", fix=fix)
    return list(value)


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


def _shown(value: Any) -> str:
    """A wrong option value for a message: numbers as written, anything else by its type (a str may be a path)."""
    if value is None or isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)):
        return repr(value.item() if isinstance(value, np.generic) else value)
    return describe(value)


def did_you_mean(word: Any, choices: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for a plain word close to one of ``choices`` (any case), else ``""``: a typo's
    message then names the near choice, as the command line's own options do."""
    import difflib

    if not isinstance(word, str) or label(word) != repr(word):
        return ""
    lower = {c.lower(): c for c in choices if isinstance(c, str)}  # a None among the choices is no word
    near = difflib.get_close_matches(word.lower(), list(lower), n=1, cutoff=0.6)
    return f"; did you mean '{lower[near[0]]}'?" if near else ""


def label(value: Any) -> str:
    """A wrong choice for a message: a short plain word as written (``'rigd'``: the typo shows), anything else by
    its type (a path, free text or an array is never echoed)."""
    if isinstance(value, str) and len(value) <= 32 and value.isprintable() and not set(value) & set("/\\:^"):
        return repr(value)
    if isinstance(value, str):  # its length tells a pasted path from a typo without showing either
        return f"(a str of {len(value)} characters, not shown)"
    return describe(value)


def choice(value: Any, name: str, choices: Any, *, fix: Optional[str] = None) -> Any:
    """``value`` when it is one of ``choices`` (None only when listed), or a typed error naming the choices.

    Why: an array compared with ``in`` raised NumPy's bare "truth value is ambiguous", a list "unhashable".

    Raises:
        InvalidInputError: anything else (the value shown by :func:`label`, and the near choice of a typo by
            :func:`did_you_mean`: ``unknown registration kind 'rigd'; did you mean 'rigid'?``).
    """
    if (value is None or isinstance(value, str)) and value in choices:
        return value
    raise unknown_choice(value, name, choices, fix=fix)


def unknown_choice(value: Any, name: str, choices: Any, *, fix: Optional[str] = None) -> InvalidInputError:
    """The error for ``value`` that names none of ``choices``: ``unknown <name> <value>; did you mean 'x'?``, the
    fix listing the choices (or ``fix``). For checks that match in their own way (any case, aliases) and then
    raise it; :func:`choice` does both.

    Returns:
        The :class:`InvalidInputError`, to raise.
    """
    words = ", ".join("None" if c is None else str(c) for c in choices)
    return InvalidInputError(f"unknown {name} {label(value)}{did_you_mean(value, list(choices))}",
                             fix=fix or f"use one of {words}")


def flag(value: Any, name: str) -> bool:
    """A yes/no option as a bool, or a typed error.

    Why: ``overlay="no"`` is a true value in Python, so it meant yes.

    Raises:
        InvalidInputError: not a bool (NumPy's bools are bools).
    """
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidInputError(f"{name} must be True or False, got {describe(value)}", fix=f"pass {name}=True or False")
    return bool(value)


def _figure(x: Any) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _range_words(low: Any, high: Any, *, open_low: bool = False, open_high: bool = False) -> str:
    low, high = (None if v is None else _figure(v) for v in (low, high))
    if low is not None and high is not None:
        if open_low or open_high:
            return f" in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        return f" from {low} to {high}"
    if low is not None:
        return f" above {low}" if open_low else f" of {low} or more"
    if high is not None:
        return f" below {high}" if open_high else f" of {high} or less"
    return ""


def whole(value: Any, name: str, *, example: str, minimum: Optional[int] = None, maximum: Optional[int] = None,
          what: str = "a whole number", none_ok: bool = False) -> Optional[int]:
    """``value`` as an int within ``minimum..maximum``, or a typed error naming the option.

    Why: ``True`` is an int to Python (it would quietly mean 1), ``1.5`` and ``"8"`` fail deep inside NumPy or
    SWIG, and a negative seed makes SimpleITK use the wall clock.

    Raises:
        InvalidInputError: a bool, a non-integer, or a number out of range; ``fix`` shows ``example``.
    """
    if value is None and none_ok:
        return None
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) \
        and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        extra = " (or None)" if none_ok else ""
        raise InvalidInputError(f"{name} must be {what}{_range_words(minimum, maximum)}{extra}, got {_shown(value)}",
                                fix=f"pass e.g. {example}")
    return int(value)


def number(value: Any, name: str, *, example: str, low: Optional[float] = None, high: Optional[float] = None,
           open_low: bool = False, open_high: bool = False, what: str = "a number", finite: bool = True) -> float:
    """``value`` as a float within ``low..high`` (ends open when asked), or a typed error naming the option.

    ``finite=False`` lets NaN and infinity through, to a caller that has a meaning for them.

    Why: ``float()`` says only "must be a real number", a str or None fails inside a NumPy comparison, and NaN
    passes every ``<`` check silently.

    Raises:
        InvalidInputError: a bool, a str, a non-number, NaN or infinity (unless allowed), or a number out of range.
    """
    try:
        x = float(value) if not isinstance(value, (bool, np.bool_, str, bytes)) else None
    except (TypeError, ValueError):
        x = None
    above = low is None or x is not None and (x > low if open_low else x >= low)
    below = high is None or x is not None and (x < high if open_high else x <= high)
    ok = x is not None and (not finite or bool(np.isfinite(x))) and above and below
    if not ok:
        rng = _range_words(low, high, open_low=open_low, open_high=open_high)
        raise InvalidInputError(f"{name} must be {what}{rng}, got {_shown(value)}", fix=f"pass e.g. {example}")
    return x


def user_stacklevel() -> int:
    """The ``stacklevel`` for a warning raised by the caller that points at the first frame outside medfuse
    (and contextlib's decorator wrapper): the user's line, however many medfuse functions lie between."""
    import sys

    here = os.path.dirname(os.path.abspath(__file__))  # the medfuse package
    frame, level = sys._getframe(2), 2  # 1: the function that warns
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not (name.startswith(here + os.sep) or os.path.basename(name) == "contextlib.py"):
            return level
        frame, level = frame.f_back, level + 1
    return level


def refuse_dose_grid(volume: Any, *, role: str) -> None:
    """Refuse an RT dose grid (unit ``Gy``) as an image to register.

    Why: a dose grid holds no anatomy (smooth isodose shells, zero outside the beams), so a similarity metric finds
    nothing to align in it and a registration "converges" to a meaningless transform. The dose lies in the patient
    space of its planning CT (they share a FrameOfReferenceUID): register that CT, and move the dose with the CT's
    transform.

    Args:
        volume: the image about to be registered (anything else than a Volume in Gy passes).
        role: ``"fixed"`` or ``"moving"``: which side of the registration it was given as.

    Raises:
        RegistrationError: ``volume`` is a Volume in Gy.
    """
    from .errors import RegistrationError

    if getattr(volume, "unit", None) != "Gy":
        return
    if role == "moving":
        fix = ("register the planning CT of the dose's frame of reference instead (medfuse register FIXED "
               "PLANNING_CT -o ct_on_fixed.nii.gz --transform ct.tfm), then apply that transform to the dose: "
               "medfuse resample FIXED DOSE --transform ct.tfm -o dose_on_fixed.nii.gz")
    else:
        fix = ("register onto the planning CT of the dose's frame of reference instead (medfuse register "
               "PLANNING_CT MOVING -o moving_on_ct.nii.gz): the dose lies in that CT's patient space, so the result "
               "overlays it; to put the result on the dose's grid: medfuse resample DOSE moving_on_ct.nii.gz "
               "-o moving_on_dose.nii.gz")
    raise RegistrationError(f"the {role} image is an RT dose grid (unit Gy): it holds no anatomy to register",
                            fix=fix)
