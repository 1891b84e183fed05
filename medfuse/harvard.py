"""Harvard-atlas pair folders: listing, loading and a by-case split.

Layout: ``<root>/<PAIR>/{MRI, CT|PET|SPECT}/<name>.png`` where both images of a
pair share a file name (``<root>`` may also be a single ``<PAIR>`` folder). The
file name's leading digits name the case and its last three the slice:
``28010.png`` is case 28, slice 010.

Slices of one case are nearly identical neighbours, so training and validation
must be split **by case**, or validation is optimistic. Two splits live here:

* :func:`split_cases` / :func:`training_split`: the split ``medfuse train`` uses (each pair
  type on its own, seeded by ``f"{seed}-{pair_type}"``); the shipped network's validation
  cases are this split's, so ``medfuse evaluate --split val`` and the benchmarks' tables
  (``benchmarks/fusion_quality.py``, ``benchmarks/fusion_baselines.py``) use it too.
* :func:`split_by_case`: keys on the case number across pair types (CT–MRI and SPECT–MRI
  share some pixel-identical MRI slices, which the per-type split can put on both sides).
  It is *not* the network's held-out set; the baseline tables before 2026-12-04 used it
  (``benchmarks/fusion_baselines.py --split val-by-case``).
"""

from __future__ import annotations

import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ._checks import number, whole
from .errors import InvalidInputError, MedfuseWarning, UnreadableFileError, UnsupportedDataError

__all__ = ["HarvardPair", "case_id", "case_of", "list_pairs", "load_png", "load_gray", "load_pair", "split_by_case",
           "split_cases", "training_split", "spread", "FUNCTIONAL"]

#: Sub-folder names of the non-MRI image.
FUNCTIONAL = ("CT", "PET", "SPECT")

_NAME = re.compile(r"^(\d+?)(\d{3})\.png$", re.IGNORECASE)


def case_id(filename: str | os.PathLike) -> int:
    """Case number from a Harvard file name: ``28010.png`` -> 28, ``2013.png`` -> 2.

    Args:
        filename: the file's name or path.

    Returns:
        The case number.

    Raises:
        InvalidInputError: not a path, or not a Harvard slice name.
    """
    m = _NAME.match(_path(filename, "filename").name)
    if m is None:
        raise InvalidInputError(
            f"{Path(filename).name!r} is not a Harvard slice name (case digits then a 3-digit slice, .png)",
            fix="name files like 28010.png (case 28, slice 010)",
        )
    return int(m.group(1))


@dataclass(frozen=True)
class HarvardPair:
    """One aligned pair: the MRI and the CT/PET/SPECT image of the same slice.

    Attributes:
        pair_type: the pair folder's name, e.g. ``"CT-MRI"``.
        modality: ``"CT"``, ``"PET"`` or ``"SPECT"``.
        name: the file name both images share.
        mri: the MRI image's path.
        other: the CT/PET/SPECT image's path.
    """

    pair_type: str  # folder name, e.g. "CT-MRI"
    modality: str  # "CT", "PET" or "SPECT"
    name: str  # file name shared by both images
    mri: Path
    other: Path

    @property
    def case(self) -> int:
        """The case number (:func:`case_id` of :attr:`name`)."""
        return case_id(self.name)

    @property
    def key(self) -> str:
        """``"<pair_type>/<stem>"``: unique within a Harvard root."""
        return f"{self.pair_type}/{Path(self.name).stem}"


def _path(value, what: str) -> Path:
    """``value`` as a Path, or InvalidInputError saying what to pass."""
    from .io import _as_path

    return _as_path(value, what=what, fix=f"pass {what} as a str or pathlib.Path")


def _pair_list(pairs) -> List["HarvardPair"]:
    """``pairs`` as a list of HarvardPair (a folder path would be split letter by letter)."""
    if isinstance(pairs, (str, bytes, os.PathLike)) or not hasattr(pairs, "__iter__"):
        raise InvalidInputError(f"expected a list of HarvardPair, got {type(pairs).__name__}",
                                fix="list them first: medfuse.harvard.list_pairs(root)")
    pairs = list(pairs)
    if not all(isinstance(p, HarvardPair) for p in pairs):
        raise InvalidInputError("expected a list of HarvardPair, got other items in it",
                                fix="list them with medfuse.harvard.list_pairs(root)")
    return pairs


def _check_split(val_fraction, seed) -> None:
    """A split's options: a fraction in (0, 1) and a whole-number seed (a text or None seed splits silently)."""
    number(val_fraction, "val_fraction", low=0, high=1, open_low=True, open_high=True, example="val_fraction=0.2")
    whole(seed, "seed", example="seed=0")


def _png_names(folder: Path) -> List[str]:
    """The names of the PNG files in ``folder``, their ending in any letter case (``.png``, ``.PNG``).

    Why: ``glob("*.png")`` is case-sensitive on Linux, so a camera's or Windows tool's ``.PNG`` files were left out
    of training and evaluation without a word.

    """
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())


def _pairs_in(folder: Path) -> List[HarvardPair]:
    mri = folder / "MRI"
    others = [folder / m for m in FUNCTIONAL if (folder / m).is_dir()]
    if not mri.is_dir() or len(others) != 1:
        return []
    other = others[0]
    a, b = set(_png_names(mri)), set(_png_names(other))
    if a ^ b:
        warnings.warn(f"{folder.name}: {len(a ^ b)} image(s) without a partner of the same name were ignored "
                      f"(e.g. {sorted(a ^ b)[0]})", MedfuseWarning, stacklevel=3)
    names = sorted(a & b, key=lambda n: (len(n), n))
    return [HarvardPair(folder.name, other.name, n, mri / n, other / n) for n in names]


def list_pairs(root: str | os.PathLike, *, pair_types: Optional[Iterable[str]] = None) -> List[HarvardPair]:
    """All pairs under a Harvard root (or one pair-type folder), sorted by pair type then name.

    Args:
        root: the Harvard root (``<root>/<PAIR>/{MRI, CT|PET|SPECT}/*.png``) or one ``<PAIR>`` folder.
        pair_types: keep only these pair types or modalities (``["CT-MRI"]``, ``["PET", "SPECT"]``); None: all.

    Returns:
        The pairs, sorted by pair type then name.

    Raises:
        UnreadableFileError: ``root`` is not a folder or holds no pairs.
        InvalidInputError: ``root`` is not a path, ``pair_types`` is not a list of names, is empty, or names a
            pair type or modality the folder holds no pair of (the error lists those it holds).
    """
    root = _path(root, "root")
    if pair_types is not None and not isinstance(pair_types, (str, bytes)) and hasattr(pair_types, "__iter__"):
        pair_types = list(pair_types)  # a generator is read once, here
    if pair_types is not None and (not isinstance(pair_types, list) or not all(isinstance(t, str) for t in pair_types)):
        # A bare "CT-MRI" would be read letter by letter and match nothing.
        raise InvalidInputError("pair_types takes a list of pair types or modalities",
                                fix="pass e.g. pair_types=['CT-MRI'] or ['PET', 'SPECT']")
    if not root.is_dir():
        raise UnreadableFileError("not a folder", fix="pass a folder laid out as <PAIR>/{MRI,CT|PET|SPECT}/*.png", path=root)
    pairs = _pairs_in(root)
    if not pairs:
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            pairs.extend(_pairs_in(sub))
    if pair_types is not None and pairs:
        # Why: a pair type that matches nothing (a typo, FOO) was dropped silently, and with no other type asked
        # for the answer was "no image pairs found"; it is named, with what the folder holds.
        held = sorted({p.pair_type for p in pairs}) + sorted({p.modality for p in pairs})
        unknown = [t for t in pair_types if t.upper() not in {h.upper() for h in held}]
        if unknown or not pair_types:
            from ._checks import label

            raise InvalidInputError(
                (f"unknown pair type(s) {', '.join(label(t) for t in unknown)}: this folder has no such pairs"
                 if unknown else "pair_types names no pair type (an empty list)"),
                fix=f"choose from the folder's pair types and modalities: {', '.join(held)} (none named: all "
                    "of them)")
        wanted = {t.upper() for t in pair_types}
        pairs = [p for p in pairs if p.pair_type.upper() in wanted or p.modality.upper() in wanted]
    if not pairs:
        raise UnreadableFileError(
            "no image pairs found", fix="lay the folder out as <PAIR>/{MRI,CT|PET|SPECT}/<name>.png with matching names",
            path=root,
        )
    return pairs


def load_png(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG as ``uint8``: ``(H, W)`` for grey files, ``(H, W, 3)`` for colour ones.

    16-bit grey files are brought to 8 bits by their type's range (65535 -> 255, as image tools convert
    them), not clipped at 255: the fusion metrics and their published tables are on the 0..255 scale.

    Args:
        path: the PNG file.

    Returns:
        The pixels as ``uint8``.

    Raises:
        InvalidInputError: ``path`` is not a path.
        UnreadableFileError: the file is missing or not a readable image.
        UnsupportedDataError: values outside 0..65535.
    """
    from PIL import Image, UnidentifiedImageError

    path = _path(path, "path")

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I"):  # 16-bit grey ("I;16", or "I" in older Pillow): convert() would clip
                wide = np.asarray(im).astype(np.float64)
                if wide.min() < 0 or wide.max() > 65535:
                    raise UnsupportedDataError(f"the image holds values outside 0..65535 (mode {im.mode})",
                                               fix="save it as an 8- or 16-bit PNG", path=path)
                return np.rint(wide / 257.0).astype(np.uint8)
            # Via RGB for every other mode: a palette image may be grey or colour.
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        # Why: a missing file was told "replace the file with a valid PNG"; only a damaged file needs replacing.
        if isinstance(e, FileNotFoundError):
            problem, fix = "no such file or folder", "check the path"
        elif isinstance(e, IsADirectoryError):
            problem, fix = "this is a folder, not a PNG image", "give the path of a PNG file"
        elif isinstance(e, PermissionError):
            problem = "permission denied"
            fix = "check the file's permissions (chmod u+r), or run as a user who may read it"
        else:
            problem, fix = f"cannot read the image ({type(e).__name__})", "replace the file with a valid PNG"
        raise UnreadableFileError(problem, fix=fix, path=path) from None
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0])
    return rgb


def load_gray(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG as grey float64 in 0–255 (colour through OpenCV's BGR→GRAY formula, rounded).

    Args:
        path: the PNG file.

    Returns:
        The grey image, ``(H, W)`` float64.

    Raises:
        InvalidInputError: ``path`` is not a path.
        UnreadableFileError: the file is missing or not a readable image.
        UnsupportedDataError: values outside 0..65535.
    """
    from .fusion.color import rgb_to_gray

    img = load_png(path)
    return rgb_to_gray(img) if img.ndim == 3 else img.astype(np.float64)


def load_pair(pair: HarvardPair) -> Tuple[np.ndarray, np.ndarray]:
    """``(mri, other)`` as read by :func:`load_png` (``other`` may be RGB ``uint8``).

    Args:
        pair: a pair from :func:`list_pairs`.

    Returns:
        ``(mri, other)``, ``uint8``.

    Raises:
        InvalidInputError: ``pair`` is not a :class:`HarvardPair`, or its images differ in size.
        UnreadableFileError: an image is missing or unreadable.
    """
    if not isinstance(pair, HarvardPair):
        raise InvalidInputError(f"load_pair takes a HarvardPair, got {type(pair).__name__}",
                                fix="take the pairs from medfuse.harvard.list_pairs(root)")
    mri, other = load_png(pair.mri), load_png(pair.other)
    if mri.shape[:2] != other.shape[:2]:
        raise InvalidInputError(
            f"the MRI is {mri.shape[:2]} but the {pair.modality} image is {other.shape[:2]}",
            fix="both images of a pair must have the same size", path=pair.other,
        )
    return mri, other


def spread(items: Sequence, limit: Optional[int], *, per_type: bool = False) -> list:
    """At most ``limit`` of ``items``, spread evenly over them: every ``len(items) // limit``-th from the first.

    Slices of one case come in a row, so the first few items are neighbours of one case, a poor sample. This is
    the subset ``medfuse train --val-limit`` validates on and ``medfuse evaluate --limit`` and
    ``benchmarks/fusion_quality.py --limit`` score, per pair type, so their tables compare.

    Args:
        items: a list (one pair type's pairs, or :class:`HarvardPair` of several with ``per_type``).
        limit: how many to keep, 1 or more; None keeps them all.
        per_type: keep at most ``limit`` of each ``pair_type`` (the items are :class:`HarvardPair`), spread over
            each type's pairs in plain file-name order, the order ``medfuse train`` lists them in (``11005.png``
            before ``3008.png``; :func:`list_pairs` puts shorter names first).

    Returns:
        A new list in the items' order.

    Raises:
        InvalidInputError: ``limit`` is not a whole number >= 1 (or None), ``items`` is not a list, or, with
            ``per_type``, holds something other than :class:`HarvardPair`.
    """
    limit = whole(limit, "limit", example="limit=5", minimum=1, none_ok=True)
    if per_type:
        items = _pair_list(items)
    elif isinstance(items, (str, bytes, os.PathLike)) or not hasattr(items, "__iter__"):
        raise InvalidInputError(f"spread takes a list, got {type(items).__name__}",
                                fix="list the pairs first: medfuse.harvard.list_pairs(root)")
    items = list(items)
    if limit is None:
        return items
    if per_type:
        by_type: Dict[str, list] = {}
        for p in items:
            by_type.setdefault(p.pair_type, []).append(p)
        kept = {id(p) for group in by_type.values() for p in spread(sorted(group, key=lambda p: p.name), limit)}
        return [p for p in items if id(p) in kept]
    return items[:: max(1, len(items) // limit)][:limit]


def split_by_case(pairs: Sequence[HarvardPair], *, val_fraction: float = 0.2, seed: int = 0
                  ) -> Tuple[List[HarvardPair], List[HarvardPair]]:
    """Deterministic train/validation split that never puts one case on both sides.

    Case numbers are visited in a seeded random order; a case goes to validation
    while some pair type it occurs in has fewer than ``val_fraction`` of its pairs
    there (at least one case per pair type when possible).

    Args:
        pairs: the pairs, as :func:`list_pairs` gives them.
        val_fraction: the share of each pair type's pairs to hold out, in (0, 1).
        seed: the order's seed.

    Returns:
        ``(train, validation)``, each in the input order.

    Raises:
        InvalidInputError: ``pairs`` is not a list of :class:`HarvardPair`, ``val_fraction`` not in (0, 1), or
            ``seed`` not a whole number.
    """
    pairs = _pair_list(pairs)
    _check_split(val_fraction, seed)
    cases = sorted({p.case for p in pairs})
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    totals: dict = {}
    for p in pairs:
        totals[p.pair_type] = totals.get(p.pair_type, 0) + 1
    target = {t: max(1.0, val_fraction * n) for t, n in totals.items()}
    have = {t: 0 for t in totals}
    val_cases = set()
    for c in order:
        members = [p for p in pairs if p.case == c]
        types = {p.pair_type for p in members}
        # A case must not leave its pair types with no training data either.
        if any(have[t] < target[t] for t in types) and all(
            have[t] + sum(p.pair_type == t for p in members) < totals[t] for t in types
        ):
            val_cases.add(c)
            for p in members:
                have[p.pair_type] += 1
    train = [p for p in pairs if p.case not in val_cases]
    val = [p for p in pairs if p.case in val_cases]
    return train, val


# ---------------------------------------------------------------------- the training split
def case_of(name: str | os.PathLike) -> str:
    """Case of a Harvard file name as ``medfuse train`` keys it: ``28010.png`` -> ``"28"``.

    Unlike :func:`case_id` it accepts any name (a name of three characters or fewer is its own case).

    Args:
        name: the file's name or path.

    Returns:
        The case, as text.

    Raises:
        InvalidInputError: ``name`` is not a path.
    """
    stem = _path(name, "name").stem
    return stem[:-3] or stem


def _val_cases(names: Iterable[str], pair_type: str, *, seed: int, val_fraction: float) -> set:
    """The validation cases of one pair type: a seeded shuffle of its cases, the first ``val_fraction`` (at
    least one, and never all: none of a pair type of one case)."""
    if not 0.0 < val_fraction < 1.0:
        raise InvalidInputError(f"val_fraction must be in (0, 1), got {val_fraction}", fix="use e.g. 0.2")
    # Digit cases sort as numbers (the order the shipped weights were split in); others after them.
    cases = sorted({case_of(n) for n in names}, key=lambda c: (0, int(c), "") if c.isdigit() else (1, 0, c))
    rng = random.Random(f"{seed}-{pair_type}")  # per pair type: adding a pair type never moves another's cases
    rng.shuffle(cases)
    # At least one validation case, and at least one training case (split_by_case's guard): a pair type of one
    # case went wholly to validation, silently, and trained on nothing.
    n_val = min(max(1, int(round(val_fraction * len(cases)))), len(cases) - 1)
    return set(cases[:n_val])


def split_cases(pairs: Dict[str, List[Tuple[Path, Path]]], *, seed: int = 0,
                val_fraction: float = 0.2) -> Tuple[Dict[str, list], Dict[str, list]]:
    """Split each pair type by case (never by slice) with a fixed seed; at least one validation case.

    The split ``medfuse train`` uses (the shipped weights record its validation cases). Like
    :func:`split_by_case`, a pair type keeps at least one training case: one of a single case is all training
    (no validation), one of two cases or more has at least one case on each side.

    Args:
        pairs: ``{pair type: [(mri path, other path), ...]}``, each path a str or PathLike.
        seed: the shuffle's seed (with the pair type).
        val_fraction: the share of each pair type's cases to hold out, in (0, 1).

    Returns:
        ``(train, validation)``, each ``{pair type: [(mri, other), ...]}`` in the input order.

    Raises:
        InvalidInputError: ``pairs`` is not such a dict (an entry that is not a list of (mri, other) paths),
            ``val_fraction`` not in (0, 1), or ``seed`` not a whole number.
    """
    if not isinstance(pairs, dict):
        raise InvalidInputError(f"split_cases takes {{pair type: [(mri, other), ...]}}, got {type(pairs).__name__}",
                                fix="for a list of HarvardPair use training_split(pairs)")
    _check_split(val_fraction, seed)
    train, val = {}, {}
    for ptype, items in pairs.items():
        if not isinstance(items, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2
                                                           for p in items):
            raise InvalidInputError(f"split_cases: the {ptype!r} entry must be a list of (mri, other) path pairs",
                                    fix="pass {pair type: [(mri path, other path), ...]}")
        # case_of takes str and PathLike alike (``.name`` of a str path was a bare AttributeError).
        cases = [case_of(a) for a, _ in items]
        vset = _val_cases([a for a, _ in items], ptype, seed=seed, val_fraction=val_fraction)
        val[ptype] = [p for p, c in zip(items, cases) if c in vset]
        train[ptype] = [p for p, c in zip(items, cases) if c not in vset]
    return train, val


def training_split(pairs: Sequence[HarvardPair], *, val_fraction: float = 0.2, seed: int = 0
                   ) -> Tuple[List[HarvardPair], List[HarvardPair]]:
    """:func:`split_cases` for a list of :class:`HarvardPair`: the network's train/validation split.

    Each pair type is split over all of its pairs in ``pairs``; pass every pair of a type (as
    :func:`list_pairs` gives them) to get the cases the network was trained and validated on. A pair type of
    a single case is all training (as :func:`split_by_case` does).

    Args:
        pairs: the pairs, as :func:`list_pairs` gives them.
        val_fraction: the share of each pair type's cases to hold out, in (0, 1).
        seed: the shuffle's seed (with the pair type).

    Returns:
        ``(train, validation)``, each in the input order.

    Raises:
        InvalidInputError: ``pairs`` is not a list of :class:`HarvardPair`, ``val_fraction`` not in (0, 1), or
            ``seed`` not a whole number.
    """
    pairs = _pair_list(pairs)
    _check_split(val_fraction, seed)
    vsets = {t: _val_cases((p.name for p in pairs if p.pair_type == t), t, seed=seed, val_fraction=val_fraction)
             for t in dict.fromkeys(p.pair_type for p in pairs)}
    train = [p for p in pairs if case_of(p.name) not in vsets[p.pair_type]]
    val = [p for p in pairs if case_of(p.name) in vsets[p.pair_type]]
    return train, val
