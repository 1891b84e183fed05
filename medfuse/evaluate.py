"""Score fusion methods over a folder of Harvard-layout pairs or a list of volume pairs.

Runs each method (classical or ``network``) on every pair, writes the fused
outputs (PNG for 2-D pairs, NIfTI for volumes), ``metrics.csv`` and
``metrics.json`` (every metric per image, and means per method and pair type with their median, 95 %
interval over cases and number of cases), and prints a summary table (the metrics asked for, or the summary
ones) with a line naming its columns, one naming the metrics it leaves out, and each row's spread. The methods
may include fusion rules of the caller's (functions, as :func:`medfuse.fuse` takes them) and the identity
baselines ``copy-a``/``copy-b`` (:data:`BASELINES`). A pair image path that names nothing
is bad input, refused before any work. A pair that cannot be read or fused is reported and
skipped; the run goes on and its result says it failed (exit code 1); when no image at all was scored,
no table is written either. Bad arguments, an unknown device or one this machine lacks and outputs that exist
are refused before anything is written.

``mask`` (``--mask``) scores a region of interest (:func:`medfuse.metrics.score`'s ``mask``): ``"auto"``
is the foreground, the union over the sources of the pixels above that source's minimum, on the images as
scored (2-D: the grey images; volumes: the sources on 0..255 as the fusion saw them); a mask file or Volume
(volume pairs only) must lie on the pair's grid. ``metrics.json`` records the choice, and per image the
fraction of pixels inside.

    medfuse evaluate ../shared/data/harvard-pairs --methods mean,max,gff --out eval/ --split val
    medfuse evaluate --pair t1n.nii.gz t2f.nii.gz --methods mean,max --mask auto --out eval3d/
    medfuse evaluate --pair MRI/25015.png PET/25015.png --methods mean,max --out eval1/
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import stat
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._checks import as_list, choice, describe, label, unknown_choice
from .errors import (CancelledError, GeometryError, InvalidInputError, MedfuseError, MissingDependencyError,
                     OutputExistsError, OutputWriteError, UnreadableFileError, WeightsError)
from .fusion import _rule_name
from .fusion.classical import METHODS as CLASSICAL_METHODS
from .io._atomic import case_key
from .progress import CancelToken, ProgressFn, check, check_callbacks, report

__all__ = ["evaluate", "EvaluationResult", "add_arguments", "run", "format_table", "table_notes", "DEFAULT_METHODS",
           "BASELINES"]

#: Every classical rule (a rule added to ``classical.METHODS`` is evaluated by default too).
DEFAULT_METHODS = CLASSICAL_METHODS
#: Identity baselines, chosen by name in ``methods`` (``--methods``), never run by default: the "fused" image is
#: one source unchanged: ``copy-a`` the pair's first image (the MRI of a Harvard pair, the fixed volume of a
#: ``--pair``), ``copy-b`` the second (CT/PET/SPECT), ``copy-c`` a third. Not fusions: the floor a fusion must
#: clear, because VIF, SSIM and MI sum over the sources and so score F = A as about 1 + f(A, B), and Qabf rewards
#: copying the edge-rich source (docs/fusion.md, "Identity baselines").
BASELINES = {"copy-a": 0, "copy-b": 1, "copy-c": 2}
#: The spread :func:`_means` adds per method and pair type: a 95 % interval of each mean by bootstrap over cases
#: (resamples, seed), cases being the patients of a Harvard folder (each pair given one by one is its own case).
BOOTSTRAP = {"unit": "case", "resamples": 2000, "seed": 0, "level": 0.95, "statistic": "mean"}
#: Columns of the printed summary (all metrics go into the files).
SUMMARY_METRICS = ("EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM", "SSIM_r2", "CC", "PSNR")


@dataclass(repr=False)
class EvaluationResult:
    """What :func:`evaluate` returns.

    Attributes:
        out_dir: the folder written.
        rows: one dict per scored image: ``method``, ``pair_type``, ``name``, ``output``, ``output_sha256``
            (the fused image's SHA-256; None with ``save_outputs=False``), ``inputs`` (per image of the pair, and
            its mask file: ``role``, ``path`` as given, patient identifiers blanked, ``sha256``) and the metrics;
            slice-wise volumes also ``axes``, ``n_slices`` (slices with content) and ``n_slices_used``
            (per metric, the slices its mean is over: NaN slices are left out); ``undefined`` (only where some
            metric had no finite value): per metric, why.
        means: ``{method: {pair_type | "all": {metric: mean, "n": images, "counts": {metric: k}, "medians":
            {metric: median}, "ci95": {metric: [low, high] or None}, "n_cases": cases}}}``: each mean is over the
            ``k`` images whose value is finite; ``ci95`` is its 95 % interval by bootstrap over cases (see
            :func:`_means`, :data:`BOOTSTRAP`).
        failures: one dict per skipped item: ``method``, ``item``, ``path``, ``error``.
        mode: ``"2d"`` for images, ``"slicewise"``/``"native"`` for volumes.
        metrics: the metrics asked for (``evaluate``'s ``metrics``), or None for all: the columns of
            :meth:`table` (None: :data:`SUMMARY_METRICS`).
    """

    out_dir: Path
    rows: List[Dict[str, Any]] = field(default_factory=list)
    means: Dict[str, Dict[str, Dict[str, float]]] = field(default_factory=dict)
    failures: List[Dict[str, Any]] = field(default_factory=list)
    mode: str = "2d"
    metrics: Optional[List[str]] = None

    @property
    def ok(self) -> bool:
        """True when every item of every method was scored."""
        return not self.failures

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def table(self, *, notes: bool = True) -> str:
        """The means as a Markdown table (:func:`format_table`): the metrics asked for, or the summary ones.

        Args:
            notes: (keyword-only) add :func:`table_notes` below it: what each column is, that higher is better,
                and the metrics scored that the table leaves out (they are in metrics.csv and metrics.json).
        """
        # Why: the columns were always SUMMARY_METRICS, so --metrics AG,FMI printed a table with none of them.
        text = format_table(self.means, metrics=self.metrics)
        return f"{text}\n\n{table_notes(self.means, metrics=self.metrics)}" if notes else text

    #: How many of the table's columns the short repr quotes per method.
    _REPR_METRICS = 3

    def __repr__(self) -> str:
        # Short, for a notebook cell: the dataclass repr printed every row (each input's path and hash, every
        # metric) and every mean, thousands of characters for a handful of pairs; table() shows them all.
        try:
            cols = _table_columns(self.means, self.metrics, "EvaluationResult")[:self._REPR_METRICS]
            groups = [(method, t, vals) for method, by_type in self.means.items() for t, vals in by_type.items()
                      if "all" not in by_type or t == "all"]  # the overall mean where there is one
        except (InvalidInputError, AttributeError):  # means edited into another shape: say so, do not fail
            cols, groups = [], []
        parts = []
        for method, t, vals in groups:
            figures = ", ".join(f"{c} {vals[c]:.3f}" for c in cols
                                if isinstance(vals.get(c), (int, float)) and math.isfinite(vals[c]))
            where = "" if t == "all" or len(self.means.get(method, ())) == 1 else f" {t}"
            parts.append(f"{method}{where} (n={vals.get('n', '?')}): {figures or 'no finite figures'}")
        # The folder by its name only (a folder above may be named after the patient: the CLI blanks such names).
        out = repr(os.path.basename(os.fspath(self.out_dir))) if isinstance(self.out_dir, (str, os.PathLike)) \
            else describe(self.out_dir)
        return (f"EvaluationResult(mode={self.mode!r}, {len(self.rows or ())} images scored, "
                f"{len(self.failures or ())} failed, "
                f"out_dir={out}, means: {'; '.join(parts) or 'none'}; .table() for every column)")


# ---------------------------------------------------------------------- items
@dataclass
class _Item:
    name: str  # unique within a method: "<pair_type>/<stem>" or the volume pair's name
    pair_type: str
    load: Any  # () -> tuple of sources (arrays or Volumes)
    path: Optional[str] = None  # shown when it fails
    inputs: Tuple[str, ...] = ()  # the input files (or folders), never to be written over
    mask: Any = None  # volume pairs: this pair's own mask (a path or a Volume), instead of evaluate's mask
    sources: Tuple[Optional[str], ...] = ()  # the pair's images in order (None: a Volume), for the provenance
    case: Optional[str] = None  # the patient (Harvard: the case number), the unit of the bootstrap; None: the pair


def _harvard_items(pairs) -> List[_Item]:
    from .harvard import case_of, load_pair

    return [_Item(p.key, p.pair_type, (lambda p=p: load_pair(p)), str(p.other.parent.parent),
                  (str(p.mri), str(p.other)), sources=(str(p.mri), str(p.other)), case=case_of(p.name))
            for p in pairs]


def _is_png(x) -> bool:
    return isinstance(x, (str, os.PathLike)) and os.fspath(x).lower().endswith(".png")


def _entry_inputs(entry):
    """A pair's images: the entry itself, or a dict's ``inputs``."""
    return entry.get("inputs") if isinstance(entry, dict) else entry


def _all_png(pairs: Sequence) -> bool:
    """True when every pair is made of PNG files only; refused when PNG files are mixed with other inputs.

    Raises:
        InvalidInputError: a pair, or the list, mixes PNG images with volumes.
    """
    kinds = []
    for i, entry in enumerate(pairs):
        inputs = _entry_inputs(entry)
        if not isinstance(inputs, (list, tuple)):
            kinds.append(False)  # _volume_items says what is wrong with it
            continue
        png = [_is_png(x) for x in inputs]
        if any(png) and not all(png):
            raise InvalidInputError(f"pair {i + 1} mixes PNG images with other inputs (volumes)",
                                    fix="give 2-D pairs as PNG files only (both images of the pair), and volume "
                                        "pairs as NIfTI/DICOM only")
        kinds.append(all(png))
    if any(kinds) and not all(kinds):
        raise InvalidInputError("the pairs mix PNG image pairs with volume pairs",
                                fix="evaluate the PNG pairs and the volume pairs in two runs (each --out its own)")
    return bool(kinds) and all(kinds)


def _image_items(pairs: Sequence) -> List[_Item]:
    """2-D pairs given as PNG files (``--pair mri.png pet.png``): read and scored as the folder mode does."""
    items = []
    for i, entry in enumerate(pairs):
        name = None
        if isinstance(entry, dict):
            if entry.get("mask") is not None:
                raise InvalidInputError(f"pair {i + 1} has its own mask; 2-D pairs take mask 'auto' or none",
                                        fix="leave the pair's mask out (mask='auto' scores the foreground)")
            name = entry.get("name")
        paths = [os.fspath(x) for x in _entry_inputs(entry)]
        if not 2 <= len(paths) <= 3:
            raise InvalidInputError(f"pair {i + 1} names {len(paths)} image(s); a pair is 2 or 3 images",
                                    fix="give the pair's images, e.g. --pair MRI/2013.png CT/2013.png")
        if name is None:
            name = "_".join(Path(p).stem for p in paths)
        elif not str(name).strip() or Path(str(name)).is_absolute() or ".." in Path(str(name)).parts:
            raise InvalidInputError(f"pair {i + 1} has the name {name!r}, which is not a relative file name",
                                    fix="name it like 'case28'")
        # Three sources form their own group: MI, SCD, VIF and the SSIMs sum over the sources, and a mean over 2-
        # and 3-source rows mixed two scales (SSIM 1.51 and 1.87 averaged to 1.69).
        kind = "images" if len(paths) == 2 else "images (3 sources)"
        items.append(_Item(str(name), kind, (lambda ps=tuple(paths): _load_pngs(ps)), paths[-1], tuple(paths),
                           sources=tuple(paths)))
    return items


def _load_pngs(paths: Sequence[str]) -> Tuple[np.ndarray, ...]:
    """The images as the folder mode reads a pair (:func:`medfuse.harvard.load_png`: grey, or RGB ``uint8``)."""
    from .harvard import load_png

    imgs = tuple(load_png(p) for p in paths)
    for p, img in zip(paths[1:], imgs[1:]):
        if img.shape[:2] != imgs[0].shape[:2]:
            raise InvalidInputError(f"the first image is {imgs[0].shape[:2]} but this one is {img.shape[:2]}",
                                    fix="both images of a pair must have the same size (aligned pairs)", path=p)
    return imgs


def _volume_items(pairs: Sequence) -> List[_Item]:
    items = []
    for i, entry in enumerate(pairs):
        name = mask = None
        if isinstance(entry, dict):
            name, mask, entry = entry.get("name"), entry.get("mask"), entry.get("inputs")
        if not isinstance(entry, (list, tuple)) or not 2 <= len(entry) <= 3:
            raise InvalidInputError(
                f"volume pair {i + 1} must be 2 or 3 Volumes or paths, got {type(entry).__name__}",
                fix="pass source=[(fixed, moving), ...] with Volumes or image paths",
            )
        paths = [str(x) for x in entry if isinstance(x, (str, os.PathLike))]
        if name is None:
            name = "_".join(_stem(p) for p in paths) if len(paths) == len(entry) else f"pair{i + 1:03d}"
        elif not str(name).strip() or Path(str(name)).is_absolute() or ".." in Path(str(name)).parts:
            # The name becomes <out>/<method>/<name>.nii.gz: it must stay inside the output folder.
            raise InvalidInputError(f"volume pair {i + 1} has the name {name!r}, which is not a relative file name",
                                    fix="name it like 'subject01'")
        if mask is not None and not (isinstance(mask, (str, os.PathLike)) or _is_volume(mask)):
            raise InvalidInputError(f"volume pair {i + 1} has a mask of type {type(mask).__name__}",
                                    fix="give a mask file (NIfTI on the pair's grid) or a Volume")
        mask = _mask_choice(mask, f"volume pair {i + 1}'s mask")
        # The mask file is an input (never written over); "auto" is no file.
        mask_path = [str(mask)] if isinstance(mask, (str, os.PathLike)) and mask != "auto" else []
        kind = "volumes" if len(entry) == 2 else "volumes (3 sources)"  # as 2-D pairs: summed metrics
        items.append(_Item(str(name), kind, (lambda e=tuple(entry): _load_volumes(e)),
                           paths[-1] if paths else None, tuple(paths + mask_path), mask,
                           sources=tuple(str(x) if isinstance(x, (str, os.PathLike)) else None for x in entry)))
    return items


def _mask_choice(mask, what: str):
    """A mask argument with ``"auto"`` spelled as medfuse compares it (any case, spaces around it), or a clear
    error for an empty name.

    Why: ``{"mask": "AUTO"}`` in a pair was read as a file named AUTO ("no such file"), ``"auto"`` in a pair was
    guarded as an input file named auto, and an empty ``--mask ""`` named the working folder, refused as "the output
    would be written inside the input folder ." (the folder was never an input).

    Raises:
        InvalidInputError: an empty or blank name.
    """
    if isinstance(mask, str):
        if not mask.strip():
            raise InvalidInputError(f"{what} is an empty name", fix="give 'auto' or a mask file, or leave the mask out")
        if mask.strip().lower() == "auto":
            return "auto"
    return mask


def _is_volume(x) -> bool:
    from .volume import Volume

    return isinstance(x, Volume)


def _stem(p: str) -> str:
    n = Path(p).name
    for suf in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr"):
        if n.lower().endswith(suf):
            return n[: -len(suf)]
    return n


def _load_volumes(entry) -> Tuple:
    from .volume import Volume

    out = []
    for x in entry:
        if isinstance(x, Volume):
            out.append(x)
        else:
            from .io import load

            out.append(load(x))
    return tuple(out)


def _blank_names(items: List[_Item]) -> List[str]:
    """Blank the inputs' patient identifiers from the items' names (row labels and output file names); returns
    them, for the failures' paths and messages.

    Why: a pair of DICOM folders named after the patient was scored as ``DOE_JOHN_b``, in metrics.csv/.json and
    as the fused file's name, and its failures quoted the folder; ``fuse`` and ``batch`` blanked the same paths.
    """
    from .provenance import scrub

    ids = _identifiers_of(p for it in items for p in it.inputs)
    if ids:
        for it in items:
            it.name = scrub(it.name, ids)
        _unique_names(items)
    return ids


def _pair_identifiers(source: Any, mask: Any = None) -> List[str]:
    """The patient identifiers of a list of pairs' DICOM inputs and of a ``mask`` file (a DICOM mask names the
    patient too); none for a folder of PNG pairs."""
    if not isinstance(source, (list, tuple)):
        return []
    extra = [mask] if isinstance(mask, (str, os.PathLike)) and mask != "auto" else []
    return _identifiers_of([*(x for p in source for x in (p if isinstance(p, (list, tuple)) else [])), *extra])


def _identifiers_of(paths: Iterable[Any]) -> List[str]:
    """The patient identifiers in the DICOM headers of those ``paths`` that exist (each read once)."""
    from .provenance import patient_identifiers

    found = list(dict.fromkeys(os.fspath(p) for p in paths if isinstance(p, (str, os.PathLike)) and os.path.exists(p)))
    return patient_identifiers(found) if found else []


def _blanked(text: Optional[str], ids: Sequence[str]) -> Optional[str]:
    from .provenance import scrub

    return scrub(text, ids) if text and ids else text


def _unique_names(items: List[_Item]) -> List[_Item]:
    """Prefix colliding names with the item's 1-based position: ``s1/mr.nii.gz s1/pet.nii.gz`` and
    ``s2/mr.nii.gz s2/pet.nii.gz`` become ``001_mr_pet`` and ``002_mr_pet``.

    Names are row labels and output file names, so two items with one name would share a file (and,
    before this, a row's scores). Names that are already unique are left alone.

    Raises:
        InvalidInputError: a numbered name still collides (with a name given explicitly).
    """
    # Compared ignoring case: names that differ only in case are one output file on Windows and macOS.
    counts = Counter(case_key(it.name) for it in items)
    for i, it in enumerate(items):
        if counts[case_key(it.name)] > 1:
            head, sep, tail = it.name.rpartition("/")  # keep a Harvard item's <PAIR>/ folder
            it.name = f"{head}{sep}{i + 1:03d}_{tail}"
    dup = [n for n, c in Counter(case_key(it.name) for it in items).items() if c > 1]
    if dup:
        raise InvalidInputError(f"more than one pair is named {dup[0]!r}", fix="give each pair a unique name")
    return items


def _items(source, *, pair_types=None) -> Tuple[List[_Item], bool]:
    """(items with unique names, is_2d) from a folder, a list of HarvardPair, or a list of volume pairs."""
    from .harvard import HarvardPair, list_pairs

    if isinstance(source, (str, os.PathLike)):
        return _unique_names(_harvard_items(list_pairs(source, pair_types=pair_types))), True
    seq = as_list(source, problem="evaluate takes a folder or a list of pairs",
                  fix="pass a Harvard-layout folder, or pairs such as [(mr, pet)] or [{'name': 's1', 'inputs': "
                      "(mr, pet)}]")
    if not seq:
        raise InvalidInputError("nothing to evaluate: the list of pairs is empty", fix="pass a folder or some pairs")
    if all(isinstance(p, HarvardPair) for p in seq):
        return _unique_names(_harvard_items(seq)), True
    if _all_png(seq):  # 2-D pairs given file by file: scored as the folder mode scores them
        return _unique_names(_image_items(seq)), True
    return _unique_names(_volume_items(seq)), False


def _check_pair_paths(items: Sequence[_Item], is_2d: bool) -> None:
    """Refuse a pair's image path that names nothing (or, for 2-D pairs, a folder), before any work.

    Why: ``--pair nonexist.png b.png`` was a per-item failure once per method, "5 item(s) failed ... Fix:
    replace the file with a valid PNG", exit 1, with nothing scored; a path that names no file is bad input,
    refused as ``medfuse fuse`` refuses it (exit 2 on the command line). A pair's own mask file is checked too, as
    ``mask`` is. One ``stat`` per file: nothing is opened.

    Raises:
        UnreadableFileError: a path that does not exist, a dangling or looping link, a pipe or device, or a
            folder given as a PNG image.
    """
    from .io import _stat_or_refuse

    for item in items:
        for p in item.inputs:
            st = _stat_or_refuse(Path(p))  # "no such file or folder. Fix: check the path." as fuse says it
            if is_2d and stat.S_ISDIR(st.st_mode):
                raise UnreadableFileError("this is a folder, not a PNG image", fix="give the path of a PNG file",
                                          path=p)


def _target(out: Path, method: str, item: _Item, is_2d: bool) -> Path:
    return out / method / f"{item.name}{'.png' if is_2d else '.nii.gz'}"


def _input_records(item: _Item, ids: Sequence[str], hashes: Dict[str, str]) -> List[Dict[str, Any]]:
    """The pair's inputs as metrics.json records them, as the provenance sidecars do: ``role`` (``fixed``,
    ``moving``; ``mask`` for a mask file), ``path`` as given, with the patient identifiers ``ids`` blanked, and
    ``sha256`` (:func:`medfuse.provenance.hash_path`; a folder's files together); path and hash None for a Volume.

    ``hashes`` caches the hashes by path: each file is read once per run, whatever the methods and pairs.

    Raises:
        UnreadableFileError: an input cannot be read to hash it.
    """
    from .provenance import hash_path

    def one(role: str, path: Optional[str]) -> Dict[str, Any]:
        if path is None:
            return {"role": role, "path": None, "sha256": None}
        if path not in hashes:
            hashes[path] = hash_path(path)
        return {"role": role, "path": _blanked(path, ids), "sha256": hashes[path]}

    recs = [one("fixed" if i == 0 else "moving", p) for i, p in enumerate(item.sources)]
    masks = item.inputs[sum(p is not None for p in item.sources):]  # the pair's inputs after its images
    return recs + [one("mask", p) for p in masks]


def _file_id(p: Path) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _refuse_writing_over_inputs(out: Path, targets: Sequence[Path], items: Sequence[_Item]) -> None:
    """An output (fused image or table) that is an input file, or lies inside an input folder, is refused even
    with ``overwrite``: ``--overwrite`` replaces earlier outputs, never the data being evaluated.

    Compared by device and inode, so another spelling of the same file (a symlink, ``..``, a hard link) is
    caught too. Only existing paths can be inputs, so a few ``stat`` calls per output.
    """
    ids = {}
    for item in items:
        for src in item.inputs:
            fid = _file_id(Path(src))
            if fid is not None:
                ids.setdefault(fid, src)
    if not ids:
        return
    seen = set()
    for target in targets:
        for q in (target, *target.parents):
            if q in seen:
                break  # its parents were checked with an earlier target
            seen.add(q)
            src = ids.get(_file_id(q)) if q.exists() else None
            if src is not None:
                raise InvalidInputError(
                    f"this output would write over the input {src}" if q == target else
                    f"this output would be written inside the input folder {src}",
                    fix="choose an --out folder apart from the inputs (--overwrite never replaces an input)",
                    path=target)


# ---------------------------------------------------------------------- one item
def _fuse_2d(sources, method: str, device: str, options: dict) -> Tuple[np.ndarray, np.ndarray, List[np.ndarray]]:
    """(image to save (uint8 grey or RGB), grey F for scoring, grey sources)."""
    from .fusion import fuse
    from .fusion.color import is_rgb, rgb_to_gray

    if isinstance(method, str) and method in BASELINES:
        k = _copied(method, len(sources))
        greys = _greys(sources)
        # The source as read (grey or RGB uint8): its grey is greys[k] exactly, so F = that source.
        return np.asarray(sources[k]), greys[k].copy(), greys
    fused = fuse(*sources, method=method, device=device, **options)
    # fuse() works on 0..1 (uint8 / 255, then * 255), so an exact .5 of the mean rule comes back as
    # 35.500000000000014 and np.round broke the tie by that noise (342-1671 pixels per Harvard pair off the
    # golden round((A + B) / 2)). Rounding to 1e-6 first drops the noise, so ties go half-to-even as documented.
    out = np.clip(np.round(np.round(np.asarray(fused, dtype=np.float64), 6)), 0, 255).astype(np.uint8)
    grey_f = rgb_to_gray(out) if is_rgb(out) else out.astype(np.float64)
    return out, grey_f, _greys(sources)


def _greys(sources) -> List[np.ndarray]:
    """The 2-D sources as scored: grey float64 (an RGB image's luma)."""
    from .fusion.color import is_rgb, rgb_to_gray

    return [rgb_to_gray(s) if is_rgb(s) else np.asarray(s, dtype=np.float64) for s in sources]


def _copied(method: str, n: int) -> int:
    """The index of the source an identity baseline (:data:`BASELINES`) copies.

    Raises:
        InvalidInputError: the pair has no such source (``copy-c`` on a pair of two).
    """
    k = BASELINES[method]
    if k >= n:
        raise InvalidInputError(f"{method} copies source {k + 1}, but this pair has {n} sources",
                                fix="use copy-a or copy-b for a pair of two images")
    return k


def _copy_rule(k: int):
    """A fusion rule (as :func:`medfuse.fuse` takes one) that returns its ``k``-th input: the Volume path of an
    identity baseline, so that grids are checked and the output written as any fused Volume is."""
    def copy_source(*arrays, **_options):
        return arrays[k]

    return copy_source


def _save_png(img: np.ndarray, path: Path, overwrite: bool, inputs: Sequence[str] = ()) -> None:
    from PIL import Image

    from .io._atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    # The pair's files: a fused image of private (chmod 600) inputs is no more readable than they are.
    with atomic_path(path, overwrite=overwrite, inputs=inputs) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def _score_volumes(vols, method: str, device: str, options: dict, mode: str, metrics, mask=None):
    """(fused Volume, scores, mask array or None); ``mask`` is None, ``"auto"`` or a Volume on the pair's grid."""
    from . import metrics as M
    from .fusion import _normalise_volumes, fuse

    # Score on the 8-bit 0..255 scale of the published definitions (as the 2-D images are
    # scored as saved), sources as the fusion saw them. Rounding also keeps MI meaningful:
    # on raw floats it counts distinct values.
    if _is_volume(mask):  # a mask off the grid fails the pair before the fusion's work
        _check_mask_grid(mask, vols[0])
    copy = _copied(method, len(vols)) if isinstance(method, str) and method in BASELINES else None
    rule = method if copy is None else _copy_rule(copy)
    fused = fuse(*vols, method=rule, device=device, **options)  # checks that the sources share a grid
    scaled, _ = _normalise_volumes(vols, options.get("normalise", "auto"))
    srcs = [np.round(np.clip(s, 0.0, 1.0) * 255.0) for s in scaled]
    # A baseline is scored as its source exactly (the float32 Volume could round a value the other way).
    f = srcs[copy].copy() if copy is not None else \
        np.round(np.clip(np.asarray(fused.array, dtype=np.float64), 0.0, 1.0) * 255.0)
    m = _mask_array(mask, srcs, vols[0])
    if sum(n > 1 for n in f.shape) == 2:
        # A single-slice volume (48x48x1) is a 2-D image: scored as one, in either mode (the 3-D modes refused it
        # with an np.squeeze/mode='2d' hint the CLI has no option for).
        keep = tuple(n for n in f.shape if n > 1)
        f, srcs = f.reshape(keep), [s.reshape(keep) for s in srcs]
        m = None if m is None else m.reshape(keep)
        if metrics is None and mode == "native":
            metrics = list(M.NATIVE_3D_METRICS)  # the metrics the mode promises, not every 2-D one
        return fused, M.score(f, *srcs, mode="2d", metrics=metrics, mask=m), m
    axes = (0, 1, 2)
    if mode == "slicewise":
        # Only the planes whose slices fit a 7x7 window: a 48x48x5 volume is scored across axis 2 (its 48x5
        # slices across axes 0 and 1 hold no window). With none, score() says why.
        fit = tuple(a for a in axes if min(n for i, n in enumerate(f.shape) if i != a) >= M._MIN_SIDE)
        axes = fit or axes
    return fused, M.score(f, *srcs, mode=mode, metrics=metrics, mask=m, axes=axes), m


# ---------------------------------------------------------------------- masks
#: How ``mask="auto"`` is computed (recorded in metrics.json).
AUTO_MASK = ("union over the sources of the pixels above that source's minimum, on the images as scored "
             "(2-D: the grey images; volumes: the sources on 0..255 as the fusion saw them)")


def _auto_mask(srcs: Sequence[np.ndarray]) -> np.ndarray:
    """The foreground: pixels above its minimum in some source (skull-stripped MR: the brain; PET: uptake)."""
    m = np.zeros(np.shape(srcs[0]), dtype=bool)
    for s in srcs:
        m |= s > s.min()
    if not m.any():
        raise InvalidInputError("mask 'auto' finds no foreground: every source is constant",
                                fix="score without a mask, or give a mask file")
    return m


def _mask_array(mask, srcs: Sequence[np.ndarray], ref=None) -> Optional[np.ndarray]:
    """The boolean region for one pair: None, the foreground of the scored sources, or a mask Volume's voxels
    (refused unless it lies on ``ref``'s grid, the grid of the pair and of the fused volume)."""
    if mask is None:
        return None
    if isinstance(mask, str):  # "auto": anything else was loaded before
        return _auto_mask(srcs)
    from .metrics import _as_mask

    where = _check_mask_grid(mask, ref)
    try:
        return _as_mask(np.asarray(mask.array), tuple(np.shape(srcs[0])))
    except InvalidInputError as e:
        raise InvalidInputError(f"the mask: {e.problem}", fix=e.fix, path=where) from None


def _check_mask_grid(mask, ref) -> Optional[str]:
    """Refuse a mask Volume off ``ref``'s grid (shape and voxel centres, as the fusion checks its inputs);
    return the mask's file, if any, for messages."""
    where = mask.provenance.get("source") if isinstance(getattr(mask, "provenance", None), dict) else None
    if not ref.same_grid(mask):
        raise GeometryError(f"the mask is on another grid than the pair's first image: {ref.grid_difference(mask)}",
                            fix="resample it onto that image first: medfuse.resample(mask, image, "
                            "interpolation='nearest'), then save it", path=where)
    return where


def _load_mask(mask):
    """A mask argument, loaded: None, ``"auto"`` or a Volume (a path is read, once)."""
    if mask is None or _is_volume(mask) or (isinstance(mask, str) and mask == "auto"):
        return mask
    from .io import load

    return load(mask)


def _mask_record(mask, ids: Sequence[str] = ()) -> Any:
    """The mask choice as metrics.json records it, its path with the inputs' patient identifiers ``ids`` blanked
    (a mask named after the patient, ``DOE_JANE/mask_DOE_JANE.nii.gz``, was kept there verbatim)."""
    if mask is None:
        return None
    if isinstance(mask, str) and mask == "auto":
        return {"kind": "auto", "definition": AUTO_MASK}
    if _is_volume(mask):
        return {"kind": "volume"}
    return {"kind": "file", "path": _blanked(str(mask), ids)}


# ---------------------------------------------------------------------- main API
def _make_folder(folder: Path) -> None:
    """The output folder made, or the typed error that says why it cannot be (a full disk, no permission)."""
    from .io._atomic import make_folder

    make_folder(folder, problem="cannot create the output folder", fix="choose another --out (a folder you can "
                "write to)")


def evaluate(source, *, methods: Sequence[Any] = DEFAULT_METHODS, out_dir: Union[str, os.PathLike],
             progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
             metrics: Optional[Sequence[str]] = None, pair_types: Optional[Sequence[str]] = None,
             mode: str = "slicewise", device: str = "cpu", overwrite: bool = False,
             save_outputs: bool = True, mask: Any = None, selection: Optional[Mapping[str, Any]] = None,
             weights: Optional[Union[str, os.PathLike]] = None, **options: Any) -> EvaluationResult:
    """Fuse every pair with every method, score the results and write the tables.

    Args:
        source: a Harvard-layout folder (``<root>/<PAIR>/{MRI,CT|PET|SPECT}/*.png``, or one
            ``<PAIR>`` folder), a list of :class:`medfuse.harvard.HarvardPair` (e.g. a validation
            split), or a list of volume pairs ``[(a, b), (a, b, c), {"name": ..., "inputs": (a, b)}]``
            whose members are Volumes or image paths (on one grid); a dict may name the pair's own mask,
            ``{"name": ..., "inputs": (a, b), "mask": "brain.nii.gz"}``, which replaces ``mask`` for it; or a
            list of 2-D pairs of PNG paths ``[("mri.png", "pet.png")]``, read and scored as a folder's pairs.
        methods: fusion methods: names (``medfuse.fusion.available_methods()``) and functions of your own, as
            :func:`medfuse.fuse` takes them (``method=``), so that a rule of yours is scored beside the built-in
            ones: ``methods=["max", "gff", my_rule]``. A function is named by its ``__name__`` (a lambda:
            ``lambda``) in the rows, the table and its output folder; metrics.json's ``custom_methods`` maps
            each such name to the function's qualified name. The identity baselines :data:`BASELINES`
            (``"copy-a"``, ``"copy-b"``, ``"copy-c"``: one source unchanged) are scored as fusions are, so that
            a table shows what not fusing scores.
        out_dir: output folder (created); fused images go to ``<out_dir>/<method>/...``.
        progress, cancel: as everywhere in medfuse.
        metrics: metric names (default: all).
        pair_types: folder sources only: restrict to these pair types (``"CT-MRI"`` or ``"CT"``).
        mode: volumes only: ``"slicewise"`` or ``"native"`` (see :func:`medfuse.metrics.score`).
        device: for the network; checked before anything is written.
        overwrite: replace existing outputs and tables (never an input).
        save_outputs: write the fused images (tables are written when at least one image was scored).
        mask: score within a region (:func:`medfuse.metrics.score`): None (the whole image), ``"auto"``
            (the foreground: the union over the sources of the pixels above that source's minimum, on the
            images as scored), or, for volume pairs, a mask file or Volume (0/1 or boolean) on the pairs'
            grid. A mask on another grid fails that pair (``GeometryError``, pointing to resampling).
        selection: recorded as metrics.json's ``"selection"``: the folder the pairs of ``source`` were chosen
            from and how (``{"folder": ..., "split": "val", "seed": 0, "val_fraction": 0.2, "limit": 1, ...}``;
            ``medfuse evaluate FOLDER`` passes it). None: a folder ``source`` records itself and ``pair_types``.
        weights: the network's weights file (``.safetensors``, e.g. what ``medfuse train`` exported; None: the
            shipped ones), for ``"network"`` only (the rules never get it); its SHA-256 is recorded in
            metrics.json (``network_weights``).
        **options: passed to :func:`medfuse.fusion.fuse` (rule or network options).

    Returns:
        An :class:`EvaluationResult`; ``result.ok`` is False when any item was skipped. When every item was
        skipped (``result.rows`` is empty) nothing is written: no tables, no folder.

    Raises:
        InvalidInputError: unknown method/metric/mode/device (a typo's message names the near one), a function among
            the methods named as a built-in method or another function, no metric named (an empty list), a metric
            ``mode="native"`` lacks (volumes), nothing to evaluate, two pairs given the same explicit name,
            ``device`` is a GPU this machine lacks (with ``"network"``), ``source``, ``methods`` or ``out_dir``
            of the wrong type, ``out_dir`` is a file, or an output
            would write over an input file (refused even with ``overwrite``), a mask file or Volume for
            2-D pairs, a pair or a list of pairs mixing PNG images with volumes.
        UnreadableFileError: the mask file cannot be read.
        UnreadableFileError: the folder holds no pairs; a pair's image path names nothing (or, for PNG pairs,
            a folder).
        OutputExistsError: tables or fused outputs exist and ``overwrite`` is False.
        OutputWriteError: the output folder or an output cannot be written (permission, read-only or full disk, a
            name too long); ``errno`` says which. Raised when found, not reported per item (every item would fail).
        CancelledError: ``cancel`` was set.

    All of these except ``CancelledError`` and a write failure found on the way (``OutputWriteError``: the fused
    images this run had written are removed then) are raised before anything is written.
    """
    from .fusion import available_methods
    from .io._atomic import atomic_write_text
    from .metrics import METRICS, _collect_undefined, score

    rules = _method_rules(methods, [*available_methods(), *BASELINES])
    methods = list(rules)  # their names: the rows' "method", the output folders, the table's rows
    choice(mode, "volume scoring mode", ("slicewise", "native"))
    check_callbacks(progress, cancel)
    if metrics is not None:
        from .metrics import _names

        metrics = _names(metrics, METRICS)
    from .fusion.device import check_device_name

    # Every method takes it: an unknown name failed each item alone, after the (empty) tables were written.
    check_device_name(device)
    from .fusion.device import check_network_device

    # As `medfuse fuse`: a GPU this machine lacks is bad input (exit 2) for every method, not one failure per item.
    check_network_device("network" if "network" in methods else methods[0], device)
    network_weights = None
    if "network" in methods:
        from .fusion.infer import weights_sha256

        # Checked now (a missing file is a WeightsError before anything is written), and recorded: a table of
        # "network" rows must say which model made them.
        network_weights = {"path": None if weights is None else os.fspath(weights), "sha256": weights_sha256(weights)}
        _check_network_weights(weights)
    elif weights is not None:
        raise InvalidInputError("weights names the fusion network's weights file, but 'network' is not among the "
                                "methods", fix="add network to the methods, or leave weights out")
    net_options = options if weights is None else {**options, "weights": os.fspath(weights)}
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise InvalidInputError(f"out_dir must be a folder path, got {type(out_dir).__name__}",
                                fix="pass out_dir='eval' (created if missing)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidInputError("the output folder is a file", fix="choose another --out (a folder)", path=out)
    for name in ("metrics.csv", "metrics.json"):
        if (out / name).exists() and not overwrite:
            raise OutputExistsError("the evaluation tables exist", fix="choose another --out, or pass overwrite=True",
                                    path=out / name)
    if not (mask is None or isinstance(mask, (str, os.PathLike)) or _is_volume(mask)):
        # An array has no grid to check against the pairs'.
        raise InvalidInputError(f"mask must be 'auto', a mask file or a Volume, got {type(mask).__name__}",
                                fix="give the array its grid: first_image.with_array(mask), or save it as NIfTI")
    mask = _mask_choice(mask, "mask")
    items, is_2d = _items(source, pair_types=pair_types)
    _check_pair_paths(items, is_2d)
    if is_2d and mask is not None and not (isinstance(mask, str) and mask == "auto"):
        raise InvalidInputError("a mask file or Volume is for volume pairs; 2-D pairs take mask 'auto' (their "
                                "foreground) or none", fix="use --mask auto, or leave --mask out")
    if isinstance(mask, (str, os.PathLike)) and not (isinstance(mask, str) and mask == "auto"):
        for item in items:  # the mask file is an input: never written over
            item.inputs = (*item.inputs, str(mask))
    # After the mask joined the inputs: a DICOM mask's own header names the patient too.
    ids = [] if is_2d else _blank_names(items)  # PNG pairs hold no patient identifiers
    if not is_2d and mode == "native" and metrics is not None:
        from .metrics import NATIVE_3D_METRICS, _names

        _names(metrics, NATIVE_3D_METRICS)  # a 2-D-only metric is bad input now, not one failure per volume
    targets = [out / "metrics.csv", out / "metrics.json"]
    if save_outputs:
        targets += [_target(out, method, item, is_2d) for method in methods for item in items]
    _refuse_writing_over_inputs(out, targets, items)
    for method in methods:
        if (out / method).exists() and not (out / method).is_dir():
            raise InvalidInputError("the method's output folder is a file", fix="choose another --out",
                                    path=out / method)
    if save_outputs and not overwrite:
        # Refuse before the first write, not halfway through with no tables.
        for method in methods:
            for item in items:
                if _target(out, method, item, is_2d).exists():
                    raise OutputExistsError("a fused output of an earlier evaluation exists",
                                            fix="choose another --out, or pass overwrite=True",
                                            path=_target(out, method, item, is_2d))
    loaded_mask = _load_mask(mask)  # a file that cannot be read is bad input, before anything is written
    earlier = _earlier_outputs(out) if overwrite else []  # read before the tables are replaced
    made = [q for q in (out, *out.parents) if not q.exists()]  # the folders this run creates
    new_outputs: List[Path] = []  # fused images this run created (none was there before): removed if it stops
    _make_folder(out)
    result = EvaluationResult(out_dir=out, mode="2d" if is_2d else mode,
                              metrics=None if metrics is None else list(dict.fromkeys(metrics)))
    total = len(items) * len(methods)
    done = 0
    cache: Dict[int, Any] = {}  # by item index: loaded sources, reused by every method (or the exception)
    masks: Dict[int, Any] = {}  # by item index: the pair's own mask, loaded (or the exception)
    hashes: Dict[str, str] = {}  # by input path: its SHA-256, for metrics.json (each input read once)
    try:
        for method in methods:
            dead: Optional[str] = None  # set when the method itself cannot run here
            for index, item in enumerate(items):
                check(cancel, "the evaluation")
                report(progress, done / max(total, 1), f"{method}: {item.name}")
                done += 1
                if dead is not None:
                    result.failures.append({"method": method, "item": item.name, "path": None, "error": dead})
                    continue
                try:
                    if index not in cache:
                        try:
                            cache[index] = item.load()
                        except MedfuseError as e:
                            cache[index] = e
                    srcs = cache[index]
                    if isinstance(srcs, MedfuseError):
                        raise srcs
                    row: Dict[str, Any] = {"method": method, "pair_type": item.pair_type, "name": item.name}
                    if item.case is not None:  # the unit of the means' bootstrap (BOOTSTRAP)
                        row["case"] = item.case
                    if item.mask is not None and index not in masks:
                        try:
                            masks[index] = _load_mask(item.mask)
                        except MedfuseError as e:
                            masks[index] = e
                    pair_mask = masks[index] if item.mask is not None else loaded_mask
                    if isinstance(pair_mask, MedfuseError):
                        raise pair_mask
                    if is_2d:
                        img, f, greys = _fuse_2d(srcs, rules[method], device,
                                                 net_options if method == "network" else options)
                        m = _mask_array(mask, greys)
                        with _collect_undefined() as undefined:  # said once for the run, below, and in the row
                            scores = score(f, *greys, metrics=metrics, mask=m)
                        target = _target(out, method, item, True)
                        if save_outputs:
                            # Listed before the write: a Ctrl-C just after it still takes the image back.
                            new_outputs += [] if target.exists() else [target]
                            _save_png(img, target, overwrite, inputs=item.inputs)
                    else:
                        with _collect_undefined() as undefined:
                            fused, scores, m = _score_volumes(srcs, rules[method], device,
                                                              net_options if method == "network" else options,
                                                              mode, metrics, pair_mask)
                        target = _target(out, method, item, False)
                        if save_outputs:
                            from .io import save

                            _make_folder(target.parent)
                            new_outputs += [] if target.exists() else [target]
                            save(fused, target, overwrite=overwrite)
                    row["output"] = target.relative_to(out).as_posix() if save_outputs else None
                    if save_outputs:  # what was written, as a sidecar records its output
                        from .provenance import hash_path

                        row["output_sha256"] = hash_path(target)
                    else:
                        row["output_sha256"] = None
                    row["inputs"] = _input_records(item, ids, hashes)
                    if m is not None:  # what was scored: the region and its share of the image
                        row["mask"] = _mask_record(item.mask if item.mask is not None else mask, ids)
                        row["mask_fraction"] = float(m.mean())
                    row.update({k: v for k, v in scores.items() if k in METRICS})
                    if undefined:  # why a value is NaN/inf (or, slice-wise, how many slices its mean left out)
                        row["undefined"] = {k: "; ".join(dict.fromkeys(w for n, w in undefined if n == k))
                                            for k in dict.fromkeys(n for n, _ in undefined)}
                    if "n_slices_used" in scores:  # slice-wise: what each mean is over (NaN slices left out)
                        row["axes"] = list(scores["axes"])
                        row["n_slices"] = int(sum(scores["n_slices"].values()))
                        row["n_slices_used"] = dict(scores["n_slices_used"])
                    result.rows.append(row)
                except OutputWriteError as e:  # a full disk, say: every item would fail alike
                    raise _stopped(e, new_outputs, out, made) from None
                except (CancelledError, OutputExistsError):  # every item would fail alike
                    raise
                except (MissingDependencyError, WeightsError) as e:
                    dead = e.one_line()
                    result.failures.append({"method": method, "item": item.name, "path": None, "error": dead})
                except MedfuseError as e:
                    result.failures.append({"method": method, "item": item.name, "path": _blanked(e.path or item.path, ids),
                                            "error": _blanked(e.one_line(), ids)})
    except (CancelledError, KeyboardInterrupt) as e:
        # A cancelled run wrote no tables: its images alone blocked the rerun ("a fused output of an earlier
        # evaluation exists"), and the cancel message named none of them.
        removed = _remove_new_outputs(new_outputs, out)
        _remove_empty(made)  # an empty --out was left behind
        e.note = (f"no tables were written; the {removed} fused image(s) this run had written were removed, so a "
                  "rerun starts clean" if removed else "nothing was written")  # the command line's cancel message
        raise
    result.means = _means(result.rows)
    _warn_undefined(result.rows)
    if not result.rows:
        # Nothing scored (every item failed): no tables, which held no score yet blocked the re-run ("the
        # evaluation tables exist"); the folders this run made (empty: nothing was saved) go too.
        _remove_empty(made)
        report(progress, 1.0, "evaluation done")
        return result
    names = _metric_names(result.rows)
    # Both texts before either file: a table that cannot be written leaves neither, not a CSV without its JSON.
    csv_text = _csv(result, names)
    record = _json(result, source, methods, options, mask, ids, selection, pair_types)
    custom = {name: _rule_name(rule) for name, rule in rules.items() if not isinstance(rule, str)}
    if custom:  # which function each name stood for (its qualified name; its code is the caller's)
        record["custom_methods"] = custom
    copies = {m: f"source {BASELINES[m] + 1} of each pair, unchanged (identity baseline)" for m in methods
              if m in BASELINES}
    if copies:
        record["baselines"] = copies
    if network_weights is not None:
        record["network_weights"] = {**network_weights, "path": None if network_weights["path"] is None
                                     else _blanked(network_weights["path"], ids)}
    json_text = json.dumps(record, indent=1, allow_nan=False)
    atomic_write_text(out / "metrics.csv", csv_text, overwrite=overwrite)
    atomic_write_text(out / "metrics.json", json_text, overwrite=overwrite)
    if save_outputs:  # with save_outputs=False the earlier images stay: this run had none to put beside them
        written = {r["output"] for r in result.rows if r.get("output")}
        _remove_earlier_outputs(out, [e for e in earlier if e[0] not in written], items)
    report(progress, 1.0, "evaluation done")
    return result


def _method_rules(methods: Any, builtin: Sequence[str]) -> Dict[str, Any]:
    """``{name: method}`` for :func:`evaluate`'s ``methods``: a built-in name lower-cased (to itself), a function of
    the caller's (to the function, named by its ``__name__``; a lambda is ``lambda``), each once.

    Raises:
        InvalidInputError: not a name, a function or a list of them, an unknown name (a typo's message names the
            near one), none at all, or a function whose name is a built-in method's, another's, or no plain word
            (it names the output folder).
    """
    if isinstance(methods, str) or callable(methods):
        methods = [methods]
    elif not hasattr(methods, "__iter__"):
        raise InvalidInputError(f"methods must be method names or functions, got {describe(methods)}",
                                fix="pass e.g. methods=['max', 'gff'], methods='network' or methods=['max', my_rule]")
    methods = list(methods)
    fix = f"choose from {', '.join(builtin)}, or pass a function of your own (see help(medfuse.fuse), method=)"
    bad = [m for m in methods if not (isinstance(m, str) and m.lower() in builtin)
           and (not callable(m) or isinstance(m, (str, type)))]
    if len(bad) > 1:  # all of them at once (--methods lapacian,wavlet): one typo at a time took as many runs
        raise InvalidInputError(f"unknown fusion methods {', '.join(label(m) for m in bad)}", fix=fix)
    if bad:
        raise unknown_choice(bad[0], "fusion method", builtin, fix=fix)
    rules: Dict[str, Any] = {}
    for m in methods:
        if isinstance(m, str):
            rules[m.lower()] = m.lower()  # a method named twice ("max,,max") is scored once
            continue
        name = getattr(m, "__name__", None)
        name = "lambda" if name == "<lambda>" else name
        if not isinstance(name, str) or not name.replace("_", "a").replace("-", "a").isalnum() or not name.isascii():
            raise InvalidInputError(f"the fusion rule {_rule_name(m)} has no name a table row and an output folder "
                                    "can take", fix="define it with def and a plain name (def my_rule(a, b): return "
                                    "...), or pass a lambda")
        if name.lower() in builtin or name in rules and rules[name] is not m:
            raise InvalidInputError(f"the fusion rule {_rule_name(m)} is named {name!r}, as "
                                    f"{'a built-in method' if name.lower() in builtin else 'another rule'} is: the "
                                    "two would share a table row and an output folder",
                                    fix="give it a name of its own (def my_max(a, b): return numpy.maximum(a, b))")
        rules[name] = m
    if not rules:
        raise InvalidInputError("no fusion method was given (an empty list)", fix=f"choose from {', '.join(builtin)}")
    return rules


def _stopped(e: MedfuseError, new_outputs: Sequence[Path], out: Path, made: Sequence[Path] = ()) -> MedfuseError:
    """``e`` after removing the fused images this run created, with a word on it.

    Why: a run stopped by a full disk wrote no tables, yet left its first images, which then blocked the rerun
    ("a fused output of an earlier evaluation exists") and kept the disk full. Images that were there before
    the run (replaced with ``overwrite``) stay.
    """
    removed = _remove_new_outputs(new_outputs, out)
    _remove_empty(made)  # the folders it made, as a cancelled run's
    if removed:
        e.problem = (f"{e.problem}; the evaluation stopped, and the {removed} fused image(s) it had written were "
                     "removed, so a rerun starts clean")
        e.args = (e._compose(),)
    return e


def _check_network_weights(weights: Any) -> None:
    """Refuse, before anything is written, a weights file the network cannot load (truncated, a pickle, NaN
    tensors, another model's): it was tried once per item, the same error printed for every pair, exit 1.

    Without torch the network's items still fail alone (the classical methods are scored), as before.
    """
    from .errors import MissingDependencyError
    from .fusion.infer import check_weights_file, load_model

    if weights is not None:
        check_weights_file(weights)
    try:
        load_model(weights)
    except MissingDependencyError:
        return


def _remove_empty(made: Sequence[Path]) -> None:
    """Remove the folders a run created, innermost first, while they are empty (never one that holds anything)."""
    for q in made:
        try:
            q.rmdir()
        except OSError:
            break


def _remove_new_outputs(new_outputs: Sequence[Path], out: Path) -> int:
    """Remove the fused images a stopped run created, and the ``<method>/<PAIR>/`` folders that emptied; how many
    images went."""
    removed = 0
    for p in new_outputs:
        try:
            p.unlink()
            removed += 1
        except OSError:
            continue
        for q in p.parents:
            if q == out:
                break
            try:
                q.rmdir()
            except OSError:
                break
    return removed


def _warn_undefined(rows: Sequence[Dict[str, Any]]) -> None:
    """One UndefinedMetricWarning for the run: which metrics had no finite value, on how many images.

    Why: the image rows keep NaN/inf and the means leave them out (counted), but nothing said so: a NaN VIF on a
    pair with a blank source went unnoticed until someone took ``np.mean`` of the column.
    """
    from .metrics import UndefinedMetricWarning

    def finite(x) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    # A row's value is NaN/inf (2-D, native), or a slice-wise mean left some slices out (the value is finite).
    bad = Counter(k for r in rows for k in r.get("undefined", {}) if not finite(r.get(k)))
    some = Counter(k for r in rows for k in r.get("undefined", {}) if finite(r.get(k)))
    parts = [f"{k} on {n} of {len(rows)} scored images (kept as nan/inf in their rows, left out of the means: "
             "the count rows say what each mean is over)" for k, n in bad.items()]
    parts += [f"{k} on some slices of {n} volume(s) (left out of their slice means: n_slices_used)"
              for k, n in some.items()]
    if parts:
        warnings.warn(UndefinedMetricWarning("no finite value for " + "; ".join(parts)
                                             + "; metrics.json says why under 'undefined'"), stacklevel=3)


def _earlier_outputs(out: Path) -> List[Tuple[str, float]]:
    """The fused outputs an earlier evaluation in ``out`` wrote, as its metrics.json lists them (relative path,
    and the table's modification time). Nothing when there is no such table or it cannot be read."""
    table = out / "metrics.json"
    try:
        stamp = table.stat().st_mtime
        data = json.loads(table.read_text(encoding="utf-8"))
        rows = data.get("images", []) if isinstance(data, dict) else []
    except (OSError, ValueError, UnicodeDecodeError):
        return []
    return [(r["output"], stamp) for r in rows if isinstance(r, dict) and isinstance(r.get("output"), str)]


def _remove_earlier_outputs(out: Path, earlier: Sequence[Tuple[str, float]], items: Sequence[_Item]) -> None:
    """With ``overwrite``: remove the earlier run's fused outputs this run did not write again, so that no image
    lies beside a table that no longer lists it (a run with fewer methods left gff/, max/, ... behind).

    Only files medfuse evaluate wrote: listed in the earlier metrics.json, a ``<method>/...png|.nii.gz`` path
    inside ``out``, not an input, and not modified after that table was written (a file changed since is
    the user's). Folders left empty go too; anything else stays.
    """
    root = out.resolve()
    inputs = {_file_id(Path(src)) for item in items for src in item.inputs} - {None}
    for rel, stamp in earlier:
        p = out / rel
        try:
            real = p.resolve()
            if (Path(rel).is_absolute() or ".." in Path(rel).parts or len(Path(rel).parts) < 2
                    or not str(rel).lower().endswith((".png", ".nii.gz")) or root not in real.parents
                    or p.is_symlink() or not p.is_file() or _file_id(p) in inputs
                    or p.stat().st_mtime > stamp):
                continue
            p.unlink()
        except OSError:
            continue  # a file that cannot be removed stays; the new tables do not list it
        for q in p.parents:  # <method>/<PAIR>/ folders emptied by this
            if q == out or root not in q.resolve().parents:
                break
            try:
                q.rmdir()
            except OSError:
                break


# ---------------------------------------------------------------------- tables
def _metric_names(rows) -> List[str]:
    from .metrics import METRICS

    return [m for m in METRICS if any(m in r for r in rows)]


def _means(rows) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Per method and pair type (and "all"): each metric's mean over the images where it is finite,
    ``n`` (images in the group) and ``counts`` (per metric, the images the mean is over), and its spread:
    ``medians`` (per metric, the median image), ``ci95`` (per metric, ``[low, high]``: the 95 % interval of the
    mean by bootstrap over cases, :data:`BOOTSTRAP`; None with fewer than 2 cases) and ``n_cases``.

    A non-finite value has no place in a mean a table can compare (PSNR is +inf for a fused image
    equal to every source, Qabf NaN for images without edges); leaving it out silently would label a
    mean over 2 images n=3, so ``counts`` says how many, and the table marks a mean over fewer than n.

    Why cases: the slices of one patient are not independent samples; a bootstrap over the 36 CT–MRI validation
    pairs gave an interval that ignored that they come from 2 patients.
    """
    names = _metric_names(rows)
    means: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mrows = [r for r in rows if r["method"] == method]
        groups = {t: [r for r in mrows if r["pair_type"] == t] for t in dict.fromkeys(r["pair_type"] for r in mrows)}
        # No overall mean across 2- and 3-source groups: their summed metrics are on two scales.
        if len(groups) > 1 and len({"3 sources" in t for t in groups}) == 1:
            groups["all"] = mrows
        means[method] = {}
        for t, g in groups.items():
            finite = {m: _finite_values([r.get(m) for r in g]) for m in names}
            cases = [f"{r['pair_type']}/{r.get('case', r['name'])}" for r in g]  # case 20 of two pair types: two
            means[method][t] = {**{m: float(np.mean(v)) if v else float("nan") for m, v in finite.items()},
                                "n": len(g), "counts": {m: len(v) for m, v in finite.items()},
                                "medians": {m: float(np.median(v)) if v else None for m, v in finite.items()},
                                "ci95": {m: _bootstrap_ci([r.get(m) for r in g], cases) for m in names},
                                "n_cases": len(set(cases))}
    return means


def _bootstrap_ci(values: Sequence[Any], cases: Sequence[str]) -> Optional[List[float]]:
    """The 95 % percentile interval of the mean of the finite ``values`` by bootstrap over their ``cases``
    (:data:`BOOTSTRAP`): whole cases are drawn with replacement and the mean is over their images, as the table's
    mean is. None with fewer than 2 cases (one patient gives no interval over patients)."""
    by_case: Dict[str, List[float]] = {}
    for v, c in zip(values, cases):
        if v is not None and math.isfinite(float(v)):
            by_case.setdefault(c, []).append(float(v))
    if len(by_case) < 2:
        return None
    sums = np.array([sum(v) for v in by_case.values()])
    counts = np.array([len(v) for v in by_case.values()], dtype=float)
    rng = np.random.default_rng(BOOTSTRAP["seed"])
    pick = rng.integers(0, len(sums), size=(BOOTSTRAP["resamples"], len(sums)))
    boot = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    tail = 100 * (1 - BOOTSTRAP["level"]) / 2
    return [float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail))]


def _finite_values(values) -> List[float]:
    return [float(x) for x in values if x is not None and math.isfinite(float(x))]


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _csv(result: EvaluationResult, names: Optional[List[str]] = None) -> str:
    names = names if names is not None else _metric_names(result.rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    # Slice-wise volumes: the slices with content and, per metric, those its mean is over (a NaN slice is left
    # out). New columns go at the end, so that readers of the older layout find every column where it was.
    sliced = any("n_slices" in r for r in result.rows)
    extra = (["n_slices", *[f"n_slices_used:{m}" for m in names]]) if sliced else []
    blank = [""] * len(extra)
    w.writerow(["kind", "method", "pair_type", "name", "output", *names, *extra])
    for r in result.rows:
        more = ([str(r["n_slices"]), *[str(r["n_slices_used"].get(m, "")) for m in names]]
                if sliced and "n_slices" in r else blank)
        w.writerow(["image", r["method"], r["pair_type"], r["name"], r.get("output") or "",
                    *[_fmt(r.get(m)) for m in names], *more])
    for method, groups in result.means.items():
        for ptype, vals in groups.items():
            w.writerow(["mean", method, ptype, f"n={vals['n']}", "", *[_fmt(vals.get(m)) for m in names], *blank])
            # How many images each mean above is over (fewer than n where values were not finite).
            w.writerow(["count", method, ptype, f"n={vals['n']}", "",
                        *[str(vals["counts"][m]) if m in vals.get("counts", {}) else "" for m in names], *blank])
            if "medians" in vals:  # the spread (_means): median image, and the mean's 95 % interval over cases
                ci = vals.get("ci95", {})
                w.writerow(["median", method, ptype, f"n={vals['n']}", "",
                            *[_fmt(vals["medians"].get(m)) for m in names], *blank])
                for side, kind in enumerate(("ci95_low", "ci95_high")):
                    w.writerow([kind, method, ptype, f"cases={vals.get('n_cases', '')}", "",
                                *[_fmt(ci[m][side]) if ci.get(m) else "" for m in names], *blank])
    for f in result.failures:
        w.writerow(["failed", f["method"], "", f["item"], "", *[""] * len(names), *blank])
    return buf.getvalue()


def _json_option(v):
    """An option as JSON can hold it: numbers, strings, booleans and None as they are (a NaN or infinite number
    as its text, which strict JSON has no number for), anything else as its text."""
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    return str(v)


def _fmt(x) -> str:
    if x is None:
        return ""
    return repr(float(x)) if isinstance(x, (float, int, np.floating)) else str(x)


def _selection_record(source, selection, pair_types, ids: Sequence[str]) -> Optional[Dict[str, Any]]:
    """Which folder was scored and the options that chose its pairs (None for pairs given one by one)."""
    if selection is not None:
        rec = {k: _json_option(v) if not isinstance(v, (list, tuple)) else [_json_option(x) for x in v]
               for k, v in dict(selection).items()}
    elif isinstance(source, (str, os.PathLike)):
        rec = {"folder": os.fspath(source), "pair_types": list(pair_types) if pair_types else None}
    else:
        return None
    if isinstance(rec.get("folder"), str):
        rec["folder"] = _blanked(rec["folder"], ids)
    return rec


def _json(result: EvaluationResult, source, methods, options, mask=None, ids: Sequence[str] = (),
          selection=None, pair_types=None) -> Dict[str, Any]:
    from .metrics import METRICS

    from .provenance import build

    chosen = _selection_record(source, selection, pair_types, ids)
    stamp = build(inputs=[])  # the time and versions, as the sidecars write them
    return {
        # The folder scored (a split or --limit of it scored only some of its pairs: "selection" says which).
        "source": (chosen["folder"] if chosen and isinstance(chosen.get("folder"), str)
                   else _blanked(os.fspath(source), ids) if isinstance(source, (str, os.PathLike))
                   else "list of pairs"),
        "selection": chosen,
        "methods": list(methods),
        "mode": result.mode,
        # The region scored (None: whole images); a pair given its own mask says so in its image rows.
        "mask": _mask_record(mask, ids),
        "options": {k: _json_option(v) for k, v in options.items()},
        "metric_definitions": "docs/fusion.md (as ../shared/README.md, reference section)",
        # When and with what software, as every provenance sidecar records them (each image row holds its inputs'
        # paths and SHA-256, and its fused output's).
        "created_utc": stamp["created_utc"],
        "versions": stamp["versions"],
        "results_version": stamp["results_version"],  # the generation of medfuse's results (provenance.py)
        # Every metric here scores a better fusion higher (none is an error to minimise); said, not assumed.
        "higher_is_better": [m for m in METRICS if any(m in r for r in result.rows)],
        "ok": result.ok,
        "images": [{k: _finite(v) for k, v in r.items()} for r in result.rows],
        "means": {m: {t: {k: _finite(v) for k, v in vals.items()} for t, vals in g.items()} for m, g in result.means.items()},
        # How each mean's ci95 was drawn (medians and n_cases beside it in "means").
        "spread": {**BOOTSTRAP, "cases": "Harvard folders: the case number of each pair type (28010.png: case 28); "
                   "pairs given one by one: each pair its own case"},
        "failures": result.failures,
    }


def format_table(means: Dict[str, Dict[str, Dict[str, Any]]], *,
                 metrics: Optional[Sequence[str]] = None) -> str:
    """A Markdown table of the means: one row per method and pair type.

    A mean over fewer images than the row's n (values that were not finite) shows its count: ``30.125 (n=2)``.

    Args:
        means: :attr:`EvaluationResult.means`.
        metrics: (keyword-only) the columns, in order; a metric no row has is left out. None: the
            :data:`SUMMARY_METRICS` the means hold, or, when they hold none of those (an evaluation of AG and
            FMI only), every metric they hold.

    Returns:
        The table, one line per row, without a final newline.

    Raises:
        InvalidInputError: ``means`` is not a mapping.
    """
    cols = _table_columns(means, metrics, "format_table")

    def line(cells: Sequence[str]) -> str:  # as many cells in every line (an empty join gave a header cell more)
        return "| " + " | ".join(cells) + " |"

    lines = [line(["Method", "Pair", "n", *cols]), "|" + "---|" * (3 + len(cols))]
    for method, groups in means.items():
        for ptype, vals in groups.items():
            cells = []
            for c in cols:
                v, k = vals.get(c), vals.get("counts", {}).get(c)
                cell = "" if v is None or not math.isfinite(v) else f"{v:.3f}"
                if k is not None and k < vals.get("n", k):
                    cell = f"{cell} (n={k})".strip()
                cells.append(cell)
            lines.append(line([str(method), str(ptype), str(vals.get("n", "")), *cells]))
    return "\n".join(lines)


def _held(means: Mapping[str, Any], names: Iterable[str]) -> List[str]:
    """The metrics of ``names`` that some row of ``means`` holds, in that order."""
    return [m for m in names if any(m in v for g in means.values() for v in g.values())]


def _table_columns(means: Any, metrics: Optional[Sequence[str]], caller: str) -> List[str]:
    """:func:`format_table`'s metric columns: those asked for, else the summary ones held (else all held).

    Raises:
        InvalidInputError: ``means`` is not ``{method: {pair type: {metric: value}}}`` (``caller`` takes it).
    """
    from .metrics import METRICS

    if not isinstance(means, Mapping) or not all(isinstance(g, Mapping) and all(isinstance(v, Mapping)
                                                                               for v in g.values())
                                                 for g in means.values()):
        # {"a": 1}: an AttributeError from deep inside, before
        got = type(means).__name__ if not isinstance(means, Mapping) else "a mapping of another shape"
        raise InvalidInputError(f"{caller} takes the means of an evaluation ({{method: {{pair type: {{metric: "
                                f"value}}}}}}), got {got}", fix="pass result.means (or call result.table())")
    return _held(means, metrics) if metrics is not None else _held(means, SUMMARY_METRICS) or _held(means, METRICS)


def table_notes(means: Dict[str, Dict[str, Dict[str, Any]]], *, metrics: Optional[Sequence[str]] = None) -> str:
    """Plain sentences to print under :func:`format_table`'s table (same arguments): what its columns are, that
    higher is better for every one, and which metrics scored it leaves out (they are in metrics.csv and
    metrics.json).

    Why: the table named its columns by abbreviation only, and left AG, FMI and MS-SSIM out without a word
    although ``--metrics`` says "default: all". Sentences, not another table: a screen reader reads them as
    they are.

    Args:
        means: :attr:`EvaluationResult.means`.
        metrics: (keyword-only) the columns asked for, as :func:`format_table` takes them.

    Returns:
        One line per note, without a final newline.

    Raises:
        InvalidInputError: ``means`` is not a mapping.
    """
    from .metrics import METRICS, TITLES

    cols = _table_columns(means, metrics, "table_notes")
    legend = "; ".join(f"{c}: {TITLES[c]}" for c in cols if c in TITLES)
    lines = [f"Columns: n: images scored; {legend}. Higher is better for every metric (definitions: "
             "docs/fusion.md)."]
    left = [m for m in _held(means, METRICS) if m not in cols]
    if left:
        lines.append(f"Not in this table: {', '.join(left)}; every metric scored is in metrics.csv and metrics.json "
                     "(ask for the columns with --metrics, or metrics= in Python).")
    return "\n".join(lines + _spread_notes(means, cols))


def _spread_notes(means: Mapping[str, Any], cols: Sequence[str]) -> List[str]:
    """The notes on what each mean is worth, for means :func:`_means` made (none for means without ``medians``):
    per row, the median image and the mean's 95 % interval over cases; MI in bits; the identity baselines.

    Why: "the network meets the 0.68 goal" was read off a mean of 0.683 whose median was 0.670 and whose
    pairs came from 2 patients; and a copy of one source scores as well as the network on VIF, SSIM and Qabf.
    """
    groups = [(method, t, v) for method, g in means.items() for t, v in g.items() if isinstance(v.get("medians"), dict)]
    if not groups:
        return []
    b = BOOTSTRAP
    lines = [f"Spread, per row: each column's median image, and in brackets the {b['level']:.0%} interval of the mean "
             f"by bootstrap over cases (patients; {b['resamples']} resamples, seed {b['seed']}; none with one case). "
             "Pairs of one case are not independent: the number of cases is the sample size."]
    for method, t, v in groups:
        ci = v.get("ci95") or {}
        cells = []
        for c in cols:
            med, iv = v["medians"].get(c), ci.get(c)
            if med is None:
                continue
            cells.append(f"{c} {med:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else ""))
        k = v.get("n_cases")
        cases = "" if k is None else f", {k} case{'' if k == 1 else 's'}"
        n = v.get("n", "?")
        lines.append(f"  {method} {t} ({n} image{'' if n == 1 else 's'}{cases}): "
                     f"{'; '.join(cells) or 'no finite values'}")
    if "MI" in cols:
        bits = [f"{method} {t} {v['MI'] / math.log(2):.3f}" for method, t, v in groups
                if isinstance(v.get("MI"), (int, float)) and math.isfinite(v["MI"])]
        if bits:
            lines.append("MI is in nats (natural log), EN in bits; MI in bits (/ ln 2, as the VIFB and MATLAB "
                         f"toolkits report it): {', '.join(bits)}.")
    if not any(method in BASELINES for method, _, _ in groups):
        lines.append("Baselines: --methods copy-a,copy-b scores each source unchanged; VIF, SSIM and MI sum over the "
                     "sources and Qabf rewards the edge-rich source, so a copy scores high (docs/fusion.md).")
    return lines


# ---------------------------------------------------------------------- CLI
#: The examples ``medfuse evaluate --help`` shows.
HELP_EXAMPLES = """\
examples:
  medfuse evaluate ../shared/data/harvard-pairs --methods network,copy-a,max --split val -o eval/  # validation cases
  medfuse evaluate --pair t1n.nii.gz t2f.nii.gz --methods mean,max --mask auto -o eval3d/      # a volume pair
  medfuse evaluate --pair MRI/25015.png PET/25015.png --methods mean,max -o eval1/             # one 2-D pair
"""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``medfuse evaluate``'s options to ``parser`` (the CLI calls this).

    Args:
        parser: the ``argparse`` parser (or sub-parser) of ``medfuse evaluate``.

    Returns:
        ``parser``, with the options added.
    """
    parser.add_argument("source", nargs="?", default=None,
                        help="Harvard-layout folder (<root>/<PAIR>/{MRI,CT|PET|SPECT}/*.png) or one <PAIR> folder")
    parser.add_argument("--pair", nargs="+", action="append", metavar="IMAGE", default=None,
                        help="a pair: 2 or 3 volumes on one grid (NIfTI/DICOM folder), or 2-D PNG images (read "
                             "as the folder mode reads them: colour through YCbCr luma); repeat for more pairs")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated fusion methods (default: %(default)s; 'network' for the model; "
                             "copy-a, copy-b: identity baselines, the first or second image unchanged)")
    parser.add_argument("--out", "-o", required=True, help="output folder (fused images, metrics.csv, metrics.json)")
    parser.add_argument("--metrics", default=None, help="comma-separated metric names (default: all)")
    parser.add_argument("--pair-types", default=None, help="folder only: e.g. CT-MRI,PET-MRI (default: all)")
    parser.add_argument("--split", choices=("all", "train", "val"), default=None,
                        help="folder only: score the network's training cases or its validation cases (never "
                             "trained on, but they chose its exported epoch: model selection, not a held-out "
                             "test; the split 'medfuse train' uses: by case, per pair type; default: all)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="folder only: validation fraction of the split (default 0.2)")
    parser.add_argument("--seed", type=int, default=None, help="folder only: seed of the split (default 0)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="folder only: at most N pairs per pair type, spread evenly over its cases and slices")
    parser.add_argument("--mode", choices=("slicewise", "native"), default=None,
                        help="volumes (--pair): score slice-wise over the three planes or natively in 3-D (default "
                             "slicewise); a folder of 2-D image pairs is scored as images")
    parser.add_argument("--mask", default=None, metavar="auto|FILE",
                        help="score within a region: 'auto' = the foreground (pixels above their minimum in any "
                             "source, as scored); FILE = a 0/1 mask on the volume pairs' grid, for every --pair "
                             "(default: whole images)")
    parser.add_argument("--device", default="cpu", metavar="{cpu,cuda,cuda:N,auto}",
                        help="where the network runs (default: cpu; auto: a CUDA GPU when there is one); checked "
                             "before anything is written")
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help="network weights (.safetensors) instead of the shipped ones, e.g. what 'medfuse train' "
                             "exported, for the 'network' method (add it to --methods; its SHA-256 goes into "
                             "metrics.json)")
    parser.add_argument("--no-save", action="store_true", help="write only the tables, not the fused images")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (never an input)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors (no bar, no table)")
    return parser


def _val_not_held_out(val: Sequence[Any], weights: Any, root: Any = None) -> Optional[str]:
    """The warning when ``--split val`` scores cases the network's weights were not held out from, as their card
    (``val_cases``) records them (else None): a model trained with another ``--seed`` or ``--val-fraction`` was
    scored on its own training cases, its scores optimistic, without a word.

    ``root`` (the folder scored): cases are compared only where its pairs are the data the weights were trained on
    (their card's data fingerprint); the shipped weights warned on any folder whose case names met theirs.
    """
    from .fusion.infer import default_weights_path
    from .fusion.train import data_fingerprint, harvard_pairs, init_val_overlap
    from .harvard import case_of

    from .errors import MedfuseError

    fingerprint = None
    if root is not None:
        try:
            with warnings.catch_warnings():  # unpaired images: list_pairs has said so already
                warnings.simplefilter("ignore")
                fingerprint = data_fingerprint(harvard_pairs(Path(root)), Path(root))
        except MedfuseError:
            # A folder train refuses (pair names that are not CASE + a 3-digit slice, a half-copied pair type
            # that --pair-types left out) is no data any weights were trained on: nothing to warn of. It failed
            # the whole evaluate with train's message, where the other methods scored it.
            return None

    cases: Dict[str, List[str]] = {}
    for pair in val:
        cases.setdefault(pair.pair_type, []).append(case_of(pair.name))
    path = Path(weights) if weights is not None else default_weights_path()
    seen = init_val_overlap(path, {t: sorted(set(c)) for t, c in cases.items()}, fingerprint=fingerprint)
    if not seen:
        return None
    listed = "; ".join(f"{t} {', '.join(c)}" for t, c in seen.items())
    return (f"--split val scores cases the network's weights were not held out from (their card's val_cases): "
            f"{listed}; if the weights were trained on this folder, those scores are on training data. Pass the "
            "--seed and --val-fraction the weights were trained with (their card's trained_by command)")


def _csv_list(s: Optional[str]) -> Optional[List[str]]:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def run(args: argparse.Namespace, *, quiet: bool = False) -> int:
    """Run ``medfuse evaluate`` from parsed arguments; return the exit code (0 ok, 1 items skipped).

    Args:
        args: the namespace :func:`add_arguments`'s options parse into.
        quiet: (keyword-only) print only warnings and errors (as ``args.quiet``, ``-q``, does), on stderr: no bar,
            no table.

    Returns:
        The exit code: 0 when every item was scored, 1 when some were skipped (when all were, no table is
        written).

    Raises:
        MedfuseError: bad input (the CLI prints it and exits 2), e.g. InvalidInputError for both or neither of
            a folder and ``--pair``.
    """
    from .harvard import list_pairs, spread, training_split

    quiet = quiet or bool(getattr(args, "quiet", False))

    if args.source is None and not args.pair:
        raise InvalidInputError("nothing to evaluate: give a folder of image pairs or --pair images",
                                fix="medfuse evaluate FOLDER --out DIR, or medfuse evaluate --pair A B --out DIR")
    if args.source is not None and args.pair:
        raise InvalidInputError("give either a folder of image pairs or --pair images (not both)",
                                fix="medfuse evaluate FOLDER --out DIR, or medfuse evaluate --pair A B --out DIR")
    # None: not given (the parser's defaults are None so that a folder-only option given with --pair shows).
    given = {"--pair-types": getattr(args, "pair_types", None), "--split": getattr(args, "split", None),
             "--val-fraction": getattr(args, "val_fraction", None), "--seed": getattr(args, "seed", None),
             "--limit": getattr(args, "limit", None)}
    if args.pair:
        for k, images in enumerate(args.pair, start=1):
            if not 2 <= len(images) <= 3:  # "got tuple. Fix: pass source=[(fixed, moving), ...]" spoke Python
                raise InvalidInputError(f"--pair {k} names {len(images)} image(s); a pair is 2 or 3 images on one "
                                        "grid", fix="give --pair FIXED MOVING [MOVING2], once per pair")
        for option, value in given.items():
            if value is not None:  # it was silently ignored: the user believed it applied
                raise InvalidInputError(f"{option} is for a folder of image pairs; --pair scores every pair given",
                                        fix=f"leave out {option}, or give the folder instead of --pair")
    methods = [m.lower() for m in _csv_list(args.methods) or []]
    if getattr(args, "weights", None) is not None and "network" not in methods:
        # In the command's words: it said "weights names ... 'network' is not among the methods".
        raise InvalidInputError("--weights names the fusion network's weights, but --methods does not include network",
                                fix="add network to --methods (e.g. --methods network,max), or leave out --weights")
    if args.source is not None and args.mode is not None:  # it was ignored: the 2-D pairs were scored as images
        raise InvalidInputError("--mode is for volumes given with --pair; a folder of 2-D image pairs is scored as "
                                "images", fix="leave out --mode")
    if given["--limit"] is not None and given["--limit"] < 1:
        raise InvalidInputError(f"--limit must be 1 or more, got {given['--limit']}",
                                fix="give the number of pairs per pair type to score, e.g. --limit 5")
    split = given["--split"] or "all"
    early: List[Optional[str]] = []  # warnings found while choosing the pairs, said with the run's own
    if split == "all":
        # They choose between the training and validation cases; every pair was scored and they were recorded null.
        for option in ("--val-fraction", "--seed"):
            if given[option] is not None:
                raise InvalidInputError(f"{option} chooses the training/validation split, but every pair of the "
                                        "folder is scored (--split all)",
                                        fix=f"add --split val (or --split train), or leave out {option}")
    val_fraction = 0.2 if given["--val-fraction"] is None else given["--val-fraction"]
    seed = 0 if given["--seed"] is None else given["--seed"]
    if args.source is not None:
        source: Any = list_pairs(args.source, pair_types=_csv_list(args.pair_types))
        if split != "all":
            # The split `medfuse train` used (not harvard.split_by_case): "val" is the network's validation cases.
            train, val = training_split(source, val_fraction=val_fraction, seed=seed)
            source = val if split == "val" else train
        if args.limit is not None:
            # Spread over each pair type's cases and slices (the first N were neighbouring slices of one case),
            # as `medfuse train --val-limit N` picks: the same pairs, so the two tables compare.
            source = spread(source, args.limit, per_type=True)
        if split == "val" and "network" in [m.lower() for m in _csv_list(args.methods) or []]:
            early.append(_val_not_held_out(source, getattr(args, "weights", None), args.source))  # the pairs scored
    else:
        source = [tuple(p) for p in args.pair]
    # Which images a folder run scored: the folder and every option that chose its pairs (metrics.json said
    # only "list of pairs").
    selection = None if args.source is None else {
        "folder": os.fspath(args.source), "pair_types": _csv_list(args.pair_types), "split": split,
        "seed": seed if split != "all" else None, "val_fraction": val_fraction if split != "all" else None,
        "limit": args.limit, "n_pairs": len(source)}
    bar = None
    progress = None
    if not args.no_progress and not quiet:
        # The command line's own bar: none under MEDFUSE_NO_PROGRESS, TQDM_DISABLE or TERM=dumb, redrawn at most
        # every half second (this one redrew on every callback, and ignored those switches), fitted to the width.
        from .cli import _Bar

        bar = progress = _Bar("evaluate")

    from .errors import MedfuseWarning

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MedfuseWarning)
            for text in filter(None, early):
                warnings.warn(text, MedfuseWarning, stacklevel=1)
            result = evaluate(source, methods=_csv_list(args.methods) or [], out_dir=args.out, progress=progress,
                              metrics=_csv_list(args.metrics), mode=args.mode or "slicewise", device=args.device,
                              overwrite=args.overwrite, save_outputs=not args.no_save,
                              mask=getattr(args, "mask", None), selection=selection,
                              weights=getattr(args, "weights", None))
    finally:
        if bar is not None:
            bar.close()
    # One line each, as the other commands print them (not Python's file:line form); others as Python shows them.
    # The pairs' patient identifiers blanked, as in the tables (a folder named after the patient was quoted).
    # The summary line quotes --out and --mask, which may be named after the patient too (out/eval_DOE^JANE).
    ids = (_pair_identifiers(source, getattr(args, "mask", None)) if any(issubclass(w.category, MedfuseWarning) for w in caught)
           or (result.rows and not quiet) else [])
    said = set()
    for w in caught:
        if not issubclass(w.category, MedfuseWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            continue
        # -q keeps warnings, as --help says (a scale mismatch that makes the scores incomparable was dropped); one
        # line for a warning each method repeated.
        text = _blanked(' '.join(str(w.message).split()), ids)
        if text not in said:
            said.add(text)
            print(f"medfuse evaluate: warning: {text}", file=sys.stderr)
    if not result.rows:  # every item failed: evaluate wrote nothing
        print(f"medfuse evaluate: no image was scored, so no table was written ({len(result.failures)} item(s) "
              "failed, below)", file=sys.stderr)
    elif not quiet:
        print(result.table())
        within = f", within the mask {args.mask}" if getattr(args, "mask", None) else ""
        n = len(result.rows)
        print(_blanked(f"\nwrote {result.out_dir / 'metrics.csv'} and {result.out_dir / 'metrics.json'} "
                       f"({n} image{'' if n == 1 else 's'} scored{within})", ids))
    if result.failures:
        print(f"{'' if not result.rows else chr(10)}{len(result.failures)} item(s) failed and were skipped:",
              file=sys.stderr)
        from .cli import _cli_words

        # One line per item and error: a pair on two grids failed alike under every method, once per method.
        methods: Dict[Tuple[str, str], List[str]] = {}
        for f in result.failures:
            methods.setdefault((f["item"], f["error"]), []).append(f["method"])
        for (item, error), names in methods.items():
            print(f"  {', '.join(names)}: {item}: {_cli_words(error)}", file=sys.stderr)
    return result.exit_code
