"""The one-call API and the composable fusion pipeline.

``fuse_files(fixed, moving, out)`` runs load -> register -> resample onto a common grid ->
normalise -> fuse -> save, and writes a provenance sidecar beside the output. The same
chain is a :class:`Pipeline` of named steps; any step can be replaced by any callable
``step(state) -> state`` (give it a ``params`` dict to have its settings recorded).

    >>> import medfuse
    >>> r = medfuse.fuse_files("sample_volumes/mr_t1.nii.gz", "sample_volumes/pet", "fused.nii.gz",
    ...                        register="rigid", method="laplacian")        # doctest: +SKIP
    >>> r.output, r.sidecar                                                  # doctest: +SKIP
    >>> p = medfuse.Pipeline(register="rigid").replace("normalise", my_step)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._checks import MAX_THREADS, as_list, choice, describe, number, unknown_choice, user_stacklevel, whole
from .errors import (CancelledError, FusionError, InvalidInputError, MedfuseError, MedfuseWarning,
                     MissingDependencyError)
from .progress import CancelToken, ProgressFn, check, check_callbacks, report
from .volume import Volume, relabelled, require_finite

__all__ = [
    "PipelineState", "PipelineResult", "Pipeline", "fuse_files", "pipeline_parameters",
    "LoadStep", "RegisterStep", "ResampleStep", "NormaliseStep", "FuseStep", "SaveStep",
    "STEP_NAMES", "REGISTER_KINDS",
]

PathLike = Union[str, os.PathLike]
Step = Callable[["PipelineState"], "PipelineState"]

STEP_NAMES = ("load", "register", "resample", "normalise", "fuse", "save")
REGISTER_KINDS = (None, "rigid", "affine", "deformable")
_GRIDS = ("fixed", "finest")
_NORMALISE = ("auto", "percentile", "minmax", "none")


def _fusion_method(value: Any, *, what: str = "fusion method", classical: bool = False) -> str:
    """``value`` lower-cased when :func:`medfuse.fuse` knows it (any letter case, as ``fuse`` takes it), else a
    typed error.

    Why: ``Pipeline(method="lapalcian")`` was accepted and failed only at the fuse step, after loading and
    registration (minutes); a ``fallback`` typo only when the network could not run.

    Raises:
        InvalidInputError: not a str naming a method (``classical``: a classical one).
    """
    from .fusion import CLASSICAL_METHODS, available_methods

    names = list(CLASSICAL_METHODS) if classical else available_methods()
    if isinstance(value, str) and value.lower() in names:
        return value.lower()
    raise unknown_choice(value, what, names)


def _per_input(value: Any, what: str, example: str) -> Optional[List[Any]]:
    """A per-input option (one entry per input, fixed first) as a list, ``None`` when not given.

    Why: a bare str was split into its letters (``modalities="MR"`` meant ``["M", "R"]``), and an array or a
    number failed inside Python with a bare TypeError or ValueError.

    Raises:
        InvalidInputError: a str, an array, a mapping or anything else that is not a list of entries.
    """
    if value is None:
        return None
    return as_list(value, problem=f"{what} must be a list with one entry per input (fixed first)",
                   fix=f"pass e.g. {example}") or None


def _steps_text(steps: Sequence[Any]) -> str:
    """``"load 0.02 s, fuse 1.3 s"``: the steps run and their times, for the short reprs."""
    return ", ".join(f"{st.get('name', '?')} {float(st.get('seconds') or 0.0):.2g} s" if isinstance(st, Mapping)
                     else "?" for st in steps) or "none"


def _file_name(path: Any) -> str:
    """An output path by its file name only, for the short reprs (its folders may be named after the patient)."""
    if path is None:
        return "None"
    return repr(os.path.basename(os.fspath(path))) if isinstance(path, (str, os.PathLike)) else describe(path)


@dataclass(repr=False)
class PipelineState:
    """What flows from step to step. Index 0 is the fixed (reference) image; the rest are moving.

    Attributes:
        inputs: the paths (or in-memory Volumes) given to :meth:`Pipeline.run`.
        volumes: the current volumes (after each step, replaced by that step's result). A replaced load step
            need set only this (``originals``, ``transforms`` and ``registrations`` are then filled in). A replaced
            register step either records a Transform per moving volume in ``transforms`` (the resample step
            resamples the volume as loaded through it) or hands back the registered volume here, its
            ``transforms`` entry left ``None`` (the resample step takes it as it is, resampled onto the grid
            without a transform where it is not on it yet); both for one volume is an InvalidInputError.
        originals: the volumes as loaded (registration and resampling start from these, except a volume a
            replaced register step put into ``volumes``). :meth:`Pipeline.run`
            empties it after the resample step when only the built-in normalise, fuse and save steps follow (none
            of them reads it; the facts the provenance records about each input are kept), so that the inputs as
            loaded are not held in memory through the fusion beside their resampled, normalised copies.
        transforms: per moving volume, the Transform onto the fixed image (``None`` = same frame, or registered
            already in ``volumes``).
        registrations: per moving volume, the registration report dict (or ``None``).
        fused: the fused Volume once the fuse step ran.
        output: the output path (``None`` = keep in memory).
        overwrite: whether ``output`` may be replaced.
        progress, cancel: as everywhere in medfuse.
        notes: warnings and facts that steps want in the provenance (JSON-safe).
        weights_sha256: set by the fuse step when the network ran.
        output_sha256, sidecar: set by the save step.
        steps: ``{"name", "params", "seconds"}`` per step run so far (:meth:`Pipeline.run` appends one after each).
        fields_of_view: set by the resample step: per resampled volume, a
            :class:`medfuse.registration.resample.FieldOfView` (where on the grid
            it has voxels of its own, computed when asked), else None; the normalise step takes percentiles there,
            then empties the list.
    """

    inputs: List[Any]
    volumes: List[Volume] = field(default_factory=list)
    originals: List[Volume] = field(default_factory=list)
    transforms: List[Any] = field(default_factory=list)
    registrations: List[Optional[Dict[str, Any]]] = field(default_factory=list)
    fused: Optional[Volume] = None
    output: Optional[Path] = None
    overwrite: bool = False
    progress: Optional[ProgressFn] = None
    cancel: Optional[CancelToken] = None
    notes: Dict[str, Any] = field(default_factory=dict)
    weights_sha256: Optional[str] = None
    output_sha256: Optional[str] = None
    sidecar: Optional[Path] = None
    steps: List[Dict[str, Any]] = field(default_factory=list)
    fields_of_view: List[Any] = field(default_factory=list)

    def __repr__(self) -> str:
        # Short: the dataclass repr printed every registration report, note and step's parameters (a screenful).
        vols = self.volumes or ()  # a replaced step may have set None
        shapes = ", ".join(str(v.shape) if isinstance(v, Volume) else describe(v) for v in vols) or "none"
        n = len(self.inputs) if hasattr(self.inputs, "__len__") else "?"
        return (f"PipelineState({n} inputs, volumes: {shapes}, fused={self.fused!r}, "
                f"output={_file_name(self.output)}, steps: {_steps_text(self.steps or ())})")


@dataclass(repr=False)
class PipelineResult:
    """What :func:`fuse_files` and :meth:`Pipeline.run` return.

    Attributes:
        fused: the fused Volume.
        output: the written file (``None`` when not saved).
        sidecar: the provenance JSON beside it (``None`` when not saved).
        provenance: the provenance record (also when not saved).
        registrations: registration report dicts, one per moving image (``None`` when not registered).
        transforms: the Transforms (moving onto fixed), ``None`` where not registered.
        steps: ``{"name", "params", "seconds"}`` per step.
    """

    fused: Volume
    output: Optional[Path]
    sidecar: Optional[Path]
    provenance: Dict[str, Any]
    registrations: List[Optional[Dict[str, Any]]]
    transforms: List[Any]
    steps: List[Dict[str, Any]]

    @property
    def seconds(self) -> float:
        return float(sum(s.get("seconds", 0.0) for s in self.steps))

    def __repr__(self) -> str:
        # Short, for a notebook cell: the dataclass repr printed the whole provenance record and every
        # registration report (thousands of characters); they are the attributes, as before.
        prov = self.provenance if isinstance(self.provenance, Mapping) else {}
        regs, steps = list(self.registrations or ()), list(self.steps or ())  # a result built by hand, too
        seconds = sum(float(st.get("seconds") or 0.0) for st in steps if isinstance(st, Mapping))
        return (f"PipelineResult(fused={self.fused!r}, method={prov.get('method_used')!r}, "
                f"device={prov.get('device_used')!r}, output={_file_name(self.output)}, "
                f"registered={sum(r is not None for r in regs)} of {len(regs)} moving, steps: {_steps_text(steps)}; "
                f"{seconds:.3g} s in all)")


# ----------------------------------------------------------------------------- steps
def _is_plain_file(item: Any) -> bool:
    """True for a NIfTI/MetaImage/NRRD file (not a DICOM file or folder)."""
    from .io import is_image_file

    try:
        p = Path(os.fspath(item))
        return p.is_file() and is_image_file(p)
    except (TypeError, OSError):
        return False


#: The start of :func:`medfuse.load`'s warning (and provenance note) that ``body=`` went unused by one input.
_BODY_UNUSED = "body= was not used"


def _load_with_body(item: Any, body: Optional[Mapping[str, Any]], **kw: Any) -> Volume:
    """:func:`medfuse.load` of one input, with ``body`` given to it when it is a DICOM PET.

    Several inputs share one body (the PET's), so the loader's own "body= was not used" for an MR or CT beside the
    PET is left unsaid, and out of that input's provenance; :func:`_warn_body_unused` says it once when no input
    used the body. A NIfTI/MetaImage/NRRD file is loaded without it (its SUV comes from its PET-BIDS sidecar).
    """
    from .io import load

    if not body or _is_plain_file(item):
        return load(item, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*" + re.escape(_BODY_UNUSED), category=MedfuseWarning)
        vol = load(item, body=dict(body), **kw)
    said = vol.provenance.get("warnings")
    if said and not _body_used(vol):
        vol.provenance["warnings"] = [w for w in said if _BODY_UNUSED not in str(w)]
    return vol


def _body_used(vol: Volume) -> bool:
    """True when ``vol`` is a PET whose SUV factor was made with ``body=`` (its ``suv_source`` says so)."""
    return "body= gave" in str(vol.provenance.get("suv_source") or "")


def _warn_body_unused(vols: Sequence[Volume], body: Optional[Mapping[str, Any]]) -> Optional[str]:
    """Warn once, and return the message, when ``body`` was given and no volume's SUV used it (None otherwise).

    Raises:
        InvalidInputError: more than one input used it: a body is one patient's at one time, and a baseline and a
            follow-up PET (or two studies) each have their own weight in their headers.
    """
    used = sum(_body_used(v) for v in vols)
    if used > 1:
        raise InvalidInputError(f"one body (weight, height, sex) was given for {used} DICOM PETs: it is one "
                                "patient's at one scan, and would replace each PET's own header values (a "
                                "follow-up's weight is not the baseline's)",
                                fix="give body= for one PET only: load each PET with its own body= "
                                    "(medfuse.load(path, body=...)) and pass the Volumes, or leave it out")
    if not body or used:
        return None
    msg = (f"{_BODY_UNUSED}: it gives a DICOM PET's weight, height and sex for SUV, and no input is a DICOM PET "
           "in SUV (a NIfTI/MetaImage/NRRD PET takes them from its PET-BIDS sidecar)")
    warnings.warn(msg, MedfuseWarning, stacklevel=3)
    return msg


class LoadStep:
    """Load every input with :func:`medfuse.load` (Volumes given in memory pass through).

    Args:
        modalities: optional modality override per input (e.g. ``["MR", "PT"]`` for NIfTI files, or for
            Volumes and MONAI MetaTensors given in memory); ``None`` for an input keeps its own.
        suv: PET SUV kind (``"bw"``, ``"lbm"``, ``"bsa"``, ``"none"``, or ``"auto"`` as :func:`medfuse.load`
            takes it: the kind a series stored as SUV by the scanner already holds). ``"bw"`` here, unlike
            ``load``: the batch runs compare it with their sidecars, and a new default would redo every subject.
            Left out (None), it is ``"bw"`` for DICOM, and a NIfTI/MetaImage/NRRD PET loads with no warning that
            SUV was not applied (no one asked for it).
        series: optional series choice per input, for DICOM folders that hold several series (a number as
            listed, a modality, or a UID, as :func:`medfuse.load`'s ``series_uid`` takes them); ``None`` or
            ``"-"``: no choice.
        body: a DICOM PET's weight, height and sex in place of its header's, for SUV, as :func:`medfuse.load`
            takes it (e.g. ``{"weight_kg": 3.2}``); given to the inputs that are DICOM PETs only (an MR or CT
            beside them is loaded as without it), and warned about once when no input is one. The parameters
            record which of the three were given (``"body": ["weight_kg"]``), never their values.

    Two PET inputs (the first taken as the baseline): the reasons their SUVs do not compare
    (:func:`medfuse.timepoints.comparability`: tracers, uptake times, units, scanners) go into the run's
    ``notes["comparability"]`` and the sidecar's ``comparability``.

    Raises:
        InvalidInputError: when built, ``modalities`` or ``series`` not a list (one entry per input), or a
            ``series`` choice that is neither text, a number nor None; when called, an unknown modality override,
            or as :func:`medfuse.load` (an unknown ``suv``, a ``body`` :func:`medfuse.load` refuses, empty or
            all-NaN data).
        UnreadableFileError, UnsupportedDataError, MultipleSeriesError, GeometryError: when called, an input that
            :func:`medfuse.load` cannot read (missing or damaged, no image, several series and none chosen, bad
            geometry).
        CancelledError: ``state.cancel`` was set.
    """

    name = "load"

    def __init__(self, *, modalities: Optional[Sequence[Optional[str]]] = None, suv: Optional[str] = None,
                 series: Optional[Sequence[Optional[str]]] = None, body: Optional[Mapping[str, Any]] = None):
        self.modalities = _per_input(modalities, "modalities", "modalities=['MR', 'PT'] (None keeps an input's own)")
        self.series = _per_input(series, "series", "series=['CT', 'PT'] ('-' or None where no choice is needed)")
        # None is "bw" asked by no one: a NIfTI PET (which holds no SUV header) is then loaded without the
        # "suv='bw' was not applied" warning, which batch printed for every such subject.
        self._suv_asked = suv is not None
        if suv is not None:  # refused here, before any work (medfuse.load would refuse it only once loading)
            from .io import _check_suv

            _check_suv(suv)
        suv = "bw" if suv is None else suv
        self.params = {"modalities": self.modalities, "suv": suv}
        if self.series:
            from .io import series_choice_record

            self.params["series"] = [series_choice_record(s) for s in self.series]
        self.suv = suv
        self.body = None
        if body is not None:  # refused here, before any work, as suv is
            from .io.suv import BODY_KEYS, check_body

            check_body(body)
            self.body = dict(body)
            # Which were given, not their values: they are the patient's (as the sidecar drops the injected dose).
            self.params["body"] = [k for k in BODY_KEYS if k in self.body]

    def __call__(self, state: PipelineState) -> PipelineState:
        vols = []
        n = len(state.inputs)
        for i, item in enumerate(state.inputs):
            check(state.cancel, "loading")
            mod = self.modalities[i] if self.modalities and i < len(self.modalities) else None
            if isinstance(item, Volume):
                # The override applies as medfuse.load applies it to a file (a MetaTensor arrives without one).
                vols.append(relabelled(item, mod))
            else:
                pick = self.series[i] if self.series and i < len(self.series) else None
                pick = None if pick is None or str(pick).strip() in ("", "-") else str(pick).strip()
                suv = self.suv
                if not self._suv_asked and _is_plain_file(item):
                    suv = "auto"  # the same volume: a file has no SUV header to convert
                vols.append(_load_with_body(item, self.body, modality=mod, suv=suv, series_uid=pick))
            report(state.progress, (i + 1) / n, f"loaded {i + 1}/{n}")
        unused = _warn_body_unused(vols, self.body)
        if unused:
            state.notes.setdefault("warnings", []).append(unused)
        _warn_same_image(vols, state)
        if len(vols) == 2:  # two PETs, baseline first: why their SUVs do not compare (empty for other images)
            from .timepoints import comparability

            reasons = comparability(vols[0], vols[1])
            if reasons:
                state.notes["comparability"] = reasons
        state.volumes = vols
        state.originals = list(vols)
        state.transforms = [None] * (len(vols) - 1)
        state.registrations = [None] * (len(vols) - 1)
        return state


def _warn_same_image(vols: Sequence[Volume], state: PipelineState) -> None:
    """Warn when a moving input is the fixed one again: the same file twice, or ``--series PT PT`` meant as
    ``CT PT``, ran to the end with no word, and fusing an image with itself gives it back unchanged."""
    fixed = vols[0]
    for i, v in enumerate(vols[1:], start=1):
        # A sparse sample first: inputs already on one grid (a dataset's co-registered series) differ there at
        # once, without a full comparison of every voxel on each run.
        if v.shape == fixed.shape and np.allclose(v.affine, fixed.affine, atol=1e-6) \
                and np.array_equal(v.array.flat[::4099], fixed.array.flat[::4099]) \
                and np.array_equal(v.array, fixed.array):
            msg = (f"input {i + 1} (moving) holds the same image as input 1 (fixed): the same voxels on the same "
                   "grid; check that you gave the intended files (or --series choices: e.g. CT PT, not PT PT)")
            warnings.warn(msg, MedfuseWarning, stacklevel=3)
            state.notes.setdefault("warnings", []).append(msg)


class RegisterStep:
    """Register each moving image onto the fixed one with :func:`medfuse.register` (or do nothing).

    The transforms are kept; resampling happens once, in the resample step, from the originals.

    Args:
        kind: ``None`` (inputs already share a frame), ``"rigid"``, ``"affine"`` or ``"deformable"``.
        threads: ITK threads during registration. Results are bit-identical run to run only with ``1``: with
            more, ITK's multi-threaded metric sums in an order that varies, and a registration can differ in
            the last digits (measured: up to 0.003 on the 0..1 fused scale with 2 threads). ``None`` = leave
            SimpleITK's default.
        **options: passed to :func:`medfuse.register` (``metric``, ``preset``, ``seed``...).

    Raises:
        InvalidInputError: when built, an unknown ``kind`` or ``threads`` not a whole number of 1 or more;
            when called, as :func:`medfuse.register` (NaN voxels,
            an option it does not take, a deformable or singular initial transform...), or a replaced load step
            that set no ``state.volumes`` (or ``transforms`` / ``registrations`` of another count).
        UnreadableFileError: an ``initial_transform`` option naming a missing file or not a transform file.
        RegistrationError: registration cannot run on these images (constant image, no overlap, optimiser failure).
        CancelledError: ``state.cancel`` was set.
    """

    name = "register"

    def __init__(self, kind: Optional[str] = None, *, threads: Optional[int] = None, **options: Any):
        choice(kind, "registration kind", REGISTER_KINDS, fix="use None, 'rigid', 'affine' or 'deformable'")
        self.kind = kind
        self.threads = whole(threads, "threads", example="threads=1", minimum=1, maximum=MAX_THREADS, none_ok=True)
        self.options = options
        self.params = {"kind": kind, "threads": threads, **options}

    def __call__(self, state: PipelineState) -> PipelineState:
        _as_loaded(state, self.name)
        if self.kind is None or len(state.volumes) < 2:
            return state
        from .registration import register
        from .registration.register import _transform_only

        fixed = state.originals[0]
        n = len(state.originals) - 1
        with _itk_threads(self.threads):
            for i, moving in enumerate(state.originals[1:]):
                check(state.cancel, "registration")

                def sub(f: float, msg: str, i=i) -> None:
                    report(state.progress, (i + f) / n, f"registering {i + 1}/{n}: {msg}")

                # Only the transform and the report: the resample step resamples each original once, through
                # the transform; a resampled copy made here would be thrown away.
                with _transform_only():
                    res = register(fixed, moving, kind=self.kind, progress=sub, cancel=state.cancel, **self.options)
                state.transforms[i] = res.transform
                rep = res.report.to_dict()
                state.registrations[i] = rep
                if rep.get("suspect"):
                    msg = (f"registration of input {i + 2} onto input 1 looks suspect: "
                           f"{'; '.join(rep.get('suspect_reasons') or [])}; check the fused result")
                    warnings.warn(msg, MedfuseWarning, stacklevel=2)
                    state.notes.setdefault("warnings", []).append(msg)
        return state


class ResampleStep:
    """Put every volume on one grid (each moving image resampled once, through its transform).

    A moving volume that a replaced register step handed back in ``state.volumes`` (its transform ``None``) is
    taken as registered: resampled onto the grid without a transform, where it is not on it yet.

    Args:
        grid: ``"fixed"`` (the fixed image's grid, default) or ``"finest"`` (finest spacing of all inputs over
            the fixed image's field of view).
        interpolation: ``"linear"`` or ``"bspline"``.

    Raises:
        InvalidInputError: when built, an unknown ``grid``; when called, an unknown ``interpolation`` (checked by
            :func:`medfuse.resample` once a volume needs resampling).
        GeometryError: when called, an unregistered moving image that lies wholly outside the fixed image's field
            of view (one that covers under a fifth of it gets a warning, in the sidecar too).
        InvalidInputError: when called, after a replaced load or register step: no volumes, another number of
            volumes, transforms or registrations than inputs, or a moving volume both replaced in
            ``state.volumes`` and given a transform.
        CancelledError: ``state.cancel`` was set.
    """

    name = "resample"

    def __init__(self, *, grid: str = "fixed", interpolation: str = "linear"):
        choice(grid, "grid", _GRIDS)
        self.grid, self.interpolation = grid, interpolation
        self.params = {"grid": grid, "interpolation": interpolation}

    def __call__(self, state: PipelineState) -> PipelineState:
        from .registration import common_grid, resample
        from .registration.resample import not_for_measuring

        _as_loaded(state, self.name)
        vols = _resample_sources(state)
        # The grid from the inputs as loaded: a moving image a replaced register step already put on the fixed
        # grid has lost its own spacing.
        ref = vols[0] if self.grid == "fixed" else common_grid(state.originals or vols, reference_index=0)
        out, views = [], []
        for i, v in enumerate(vols):
            check(state.cancel, "resampling")
            t = None if i == 0 else state.transforms[i - 1]
            if t is None and v.same_grid(ref):
                out.append(v)
                views.append(None)
                continue
            if t is None and i > 0:
                _check_coverage(v, ref, i + 1, state)
            with not_for_measuring():  # the fused output holds no SUV to measure
                r = resample(v, ref, transform=t, interpolation=self.interpolation)
            views.append(getattr(r, "_field_of_view", None))
            # What resampling warned about (a pair from two frames of reference, unregistered) goes into the
            # sidecar too, not only to the terminal.
            said = r.provenance.get("warnings", [])[len(v.provenance.get("warnings", [])):]
            if said:
                state.notes.setdefault("warnings", []).extend(f"input {i + 1}: {w}" for w in said)
            out.append(r)
        state.volumes = out
        state.fields_of_view = views
        return state


def _as_loaded(state: PipelineState, step: str) -> None:
    """Fill what a replaced load step may leave unset: ``originals`` (the volumes it handed over) and one
    ``transforms`` and ``registrations`` entry (``None``) per moving volume.

    Why: a replaced load step that set only ``state.volumes`` (as its docstring invites) met a bare IndexError in
    the register step (``state.originals[0]``).

    Raises:
        InvalidInputError: no volumes at all, or ``transforms`` / ``registrations`` with another count than
            the moving volumes.
    """
    if not state.volumes and not state.originals:
        raise InvalidInputError(f"the {step} step found no volumes in the pipeline state",
                                fix="a replaced load step must set state.volumes to the loaded volumes, fixed first "
                                    "(state.originals, state.transforms and state.registrations may stay empty)")
    if not state.originals:
        state.originals = list(state.volumes)
    if not state.volumes:
        state.volumes = list(state.originals)
    n = len(state.originals) - 1
    for name in ("transforms", "registrations"):
        got = getattr(state, name)
        if not got:
            setattr(state, name, [None] * n)
        elif len(got) != n:
            raise InvalidInputError(f"state.{name} has {len(got)} entries for {n} moving volumes",
                                    fix=f"give state.{name} one entry per moving volume (None where there is none), "
                                        "or leave it empty")


def _resample_sources(state: PipelineState) -> List[Volume]:
    """Per input, what the resample step resamples: the volume as loaded (through its transform), or, where a
    replaced register step handed back a volume of its own in ``state.volumes``, that volume (it is registered
    already: resampled onto the grid without a transform, where it is not on it yet).

    Why: the step always started from ``state.originals``, so a replaced register step that returned the
    registered image in ``state.volumes`` was ignored and the moving image fused unregistered, silently.

    Raises:
        InvalidInputError: ``state.volumes`` with another count than the inputs as loaded, or a moving volume
            that was replaced and also given a transform (which of the two applies cannot be told).
    """
    if len(state.volumes) != len(state.originals):
        raise InvalidInputError(f"the register step left {len(state.volumes)} volumes for {len(state.originals)} "
                                "inputs", fix="a replaced register step must keep one volume per input, fixed first")
    out = []  # a replaced fixed volume (say, cropped) is the reference grid itself
    for i, (v, o) in enumerate(zip(state.volumes, state.originals)):
        if v is not o and i > 0 and state.transforms[i - 1] is not None:
            raise InvalidInputError(
                f"the register step both replaced moving input {i + 1} in state.volumes and recorded a transform "
                "for it in state.transforms; the resample step cannot tell which applies",
                fix="a replaced register step either records a Transform per moving input in state.transforms (the "
                    "input as loaded is resampled through it) or hands back the registered volume in "
                    "state.volumes, leaving its state.transforms entry None")
        out.append(v)
    return out


def _check_coverage(v: Volume, ref: Volume, n: int, state: PipelineState) -> None:
    """Refuse an unregistered moving image that lies wholly outside the fixed grid; warn when it covers little.

    Why: resampled there it is only the background value, so the "fused" image was the fixed image alone, with
    no word of it (``register`` refuses such a pair; ``register=None`` skipped that check).

    Raises:
        GeometryError: the two fields of view do not meet at all.
    """
    from .registration.resample import coverage_note

    msg = coverage_note(
        v, ref, what=f"input {n}", view="the fixed image's field of view",
        # What to do, as the refusal says it: the warning named none (a swapped FIXED/MOVING or a missing
        # registration looked like a finished fusion).
        tail="elsewhere only the fixed image contributes (rules that average, such as mean, show it darker "
             "there: a step at the border). Check that the images belong together and "
             "in this order (FIXED first); if they are not aligned in the scanners' coordinates, register them "
             "first (--register rigid on the command line, register='rigid' in fuse_files)",
        fix="check that the images belong together; if they show the same anatomy in unrelated scanner coordinates, "
            "register the moving image first, centre-aligned, check the result and fuse the registered image: "
            "medfuse.register(fixed, moving, initialise='geometry') (command line: medfuse register FIXED MOVING "
            "--initialise geometry -o moved.nii.gz)")
    if msg is not None:
        warnings.warn(msg, MedfuseWarning, stacklevel=3)
        state.notes.setdefault("warnings", []).append(msg)


def _number_pair(value: Any, name: str, example: str) -> Optional[Tuple[float, float]]:
    """``value`` as a pair of finite floats, or None for None.

    Raises:
        InvalidInputError: not a pair of finite numbers.
    """
    if value is None:
        return None
    import math

    try:
        pair = tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool)
                                 and math.isfinite(float(x)) for x in pair):
        raise InvalidInputError(f"{name} must be a pair of finite numbers, got {describe(value)}",
                                fix=f"e.g. {name}={example}")
    return float(pair[0]), float(pair[1])


class NormaliseStep:
    """Scale each volume to 0..1 so that modalities in HU, SUV and arbitrary units mix fairly.

    Uses :func:`medfuse.fusion.normalise.normalise`, the same rules the fusion network was trained with.

    Args:
        method: ``"auto"`` (by modality: CT soft-tissue window, PET SUV 0..10, MR/SPECT percentiles),
            ``"percentile"``, ``"minmax"`` or ``"none"``.
        low, high: percentiles for ``"percentile"``.
        ct_window: (keyword-only) ``(level, width)`` in HU: the window a CT in HU is mapped from (``"auto"``'s
            window rule; default ``(40, 400)``, soft tissue), e.g. ``(400, 1800)`` for bone. Inputs that are not
            a CT in HU are not affected. ``method="auto"`` only.
        suv_range: (keyword-only) ``(low, high)`` in the PET's SUV unit: the interval a PET in SUV is mapped from
            (default 0 to 10, 0 to 2.5 for SUVbsa), values outside it clipped; from 0 it is the SUV rule with
            ``suv_max=high``, from another ``low`` the ``"range"`` rule. Inputs that are not a PET in SUV are not
            affected. ``method="auto"`` only.

    The run's ``notes["normalisation_unused"]`` (the sidecar's ``normalisation_unused``) names an option given
    that applied to no input (``"ct_window"`` with no CT in HU among them).

    Raises:
        InvalidInputError: when built, an unknown ``method``, percentiles outside ``0 <= low < high <= 100``, a
            ``ct_window`` or ``suv_range`` that is not a pair of finite numbers, a width not above 0, a ``low``
            not below ``high``, or either with a ``method`` other than ``"auto"``; when called, a volume with NaN
            or infinite voxels.
        CancelledError: ``state.cancel`` was set.
    """

    name = "normalise"

    def __init__(self, *, method: str = "auto", low: float = 0.5, high: float = 99.5,
                 ct_window: Optional[Tuple[float, float]] = None,
                 suv_range: Optional[Tuple[float, float]] = None):
        choice(method, "normalisation", _NORMALISE)
        low = number(low, "low percentile", example="low=0.5", low=0, high=100)
        high = number(high, "high percentile", example="high=99.5", low=0, high=100)
        if not low < high:
            raise InvalidInputError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}",
                                    fix="e.g. low=0.5, high=99.5")
        self.ct_window = _number_pair(ct_window, "ct_window", "(40, 400) (level, width in HU)")
        self.suv_range = _number_pair(suv_range, "suv_range", "(0, 10) (low, high in SUV)")
        if self.ct_window is not None and not self.ct_window[1] > 0:
            raise InvalidInputError(f"ct_window: the width must be above 0 HU, got {self.ct_window[1]:g}",
                                    fix="give (level, width) in HU, e.g. ct_window=(40, 400) (soft tissue)")
        if self.suv_range is not None and not self.suv_range[0] < self.suv_range[1]:
            raise InvalidInputError(f"suv_range: low must be below high, got {self.suv_range[0]:g} and "
                                    f"{self.suv_range[1]:g}", fix="give (low, high) in SUV, e.g. suv_range=(0, 10)")
        if (self.ct_window or self.suv_range) and method != "auto":
            raise InvalidInputError(f"ct_window and suv_range set the CT window and the PET's SUV range of the "
                                    f"'auto' normalisation, and method is {method!r}",
                                    fix="use method='auto' (normalise='auto'), or leave out ct_window and suv_range")
        self.method, self.low, self.high = method, float(low), float(high)
        self.params = {"method": method, "low": self.low, "high": self.high} if method == "percentile" else {"method": method}
        # Recorded only when given: the parameters batch compares on re-runs stay as they were otherwise.
        if self.ct_window is not None:
            self.params["ct_window"] = list(self.ct_window)
        if self.suv_range is not None:
            self.params["suv_range"] = list(self.suv_range)

    def _chosen(self, v: Volume) -> Optional[Tuple[str, Dict[str, Any]]]:
        """``(option, normalise() keywords)`` where ``ct_window`` or ``suv_range`` applies to ``v``, else None."""
        from .fusion.normalise import auto_method

        rule = auto_method(v.modality, v.unit)
        if rule == "window" and self.ct_window is not None:
            return "ct_window", {"method": "auto", "level": self.ct_window[0], "width": self.ct_window[1]}
        if rule == "suv" and self.suv_range is not None:
            low, high = self.suv_range
            # From 0, the SUV rule itself (its record as the default's); from another low, that interval.
            return "suv_range", ({"method": "auto", "suv_max": high} if low == 0 else
                                 {"method": "range", "low": low, "high": high})
        return None

    def __call__(self, state: PipelineState) -> PipelineState:
        if self.method == "none":
            return state
        from .fusion.normalise import _in_own_view, normalise

        out, records, used = [], [], set()
        views = list(getattr(state, "fields_of_view", None) or [])
        for i, v in enumerate(state.volumes, start=1):
            check(state.cancel, "normalisation")
            require_finite(v.array, f"input {i}", before="fusing")
            kw: Dict[str, Any] = {"percentiles": (self.low, self.high)} if self.method == "percentile" else {}
            view = views[i - 1] if i - 1 < len(views) else None
            chosen = self._chosen(v)
            if chosen is not None:  # a fixed interval: no field of view needed (only percentiles use one)
                used.add(chosen[0])
                within = normalise(v.array, modality=v.modality, unit=v.unit, dtype=np.float32, **chosen[1])
            else:
                within = None if view is None else _in_own_view(
                    v.array, view, method=self.method, modality=v.modality, unit=v.unit, dtype=np.float32,
                    percentiles=(self.low, self.high) if self.method == "percentile" else None)
            if within is not None:
                scaled, rec = within
            else:
                # float32 straight away (float64 arithmetic a slab at a time, the same values): a float64 copy of
                # the whole volume cost 8 bytes a voxel on top of this step's peak.
                scaled, rec = normalise(v.array, method=self.method, modality=v.modality, unit=v.unit,
                                        dtype=np.float32, **kw)
            nv = v.with_array(scaled, unit="arbitrary")
            del scaled
            nv.provenance["normalisation"] = rec
            out.append(nv)
            records.append(rec)
        state.volumes = out
        state.notes["normalisation"] = records
        unused = [k for k in ("ct_window", "suv_range") if getattr(self, k) is not None and k not in used]
        if unused:  # asked for and applying to no input: recorded, and said by the command line
            state.notes["normalisation_unused"] = unused
        state.fields_of_view = []  # used: each holds a transform (a deformable one can be large)
        return state


def _fusion_unavailable(e: BaseException, *, user_weights: bool = False) -> bool:
    """True when the fusion network cannot run here, which is all a fallback rule covers.

    torch or the inference module missing, the shipped weights missing or broken (an install problem), or a
    failure of the network itself. Never the caller's own mistakes: an option the network does not take, a
    device, grid or input problem (InvalidInputError, GeometryError...), a ``weights=`` file the caller named
    (``user_weights``: a missing or corrupt file of theirs), nor a cancellation.

    Why: any medfuse error fell back, so a typo in ``weights=`` gave a Laplacian image labelled as the run
    the caller asked for.
    """
    from .errors import WeightsError

    if isinstance(e, CancelledError):
        return False
    if isinstance(e, (MissingDependencyError, ImportError)):
        return True
    if isinstance(e, WeightsError):
        return not user_weights
    return isinstance(e, FusionError)


class FuseStep:
    """Fuse the (registered, resampled, normalised) volumes with :func:`medfuse.fuse`.

    Args:
        method: ``"network"`` (default) or a classical rule (``"mean"``, ``"max"``, ``"laplacian"``,
            ``"wavelet"``, ``"gff"``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (network only). A GPU this machine lacks
            raises :class:`~medfuse.errors.InvalidInputError` here, whatever ``fallback`` says.
        fallback: a classical method to use, with a warning recorded in the provenance, when the network
            cannot run (weights or torch missing). It gets the ``options`` its rule takes (and ``normalise``),
            never the network's own (``weights``, ``batch_size``...). ``None`` (default): fail instead.
        **options: passed to :func:`medfuse.fuse`. The run's ``progress`` and ``cancel`` reach the fusion
            (give them to :meth:`Pipeline.run`, not here).

    Raises:
        InvalidInputError: when built, an unknown ``method``, a ``fallback`` that is no classical method, an
            unknown ``device`` or a GPU this machine lacks (every method), ``progress`` or ``cancel`` among the
            options; when called, fewer than two volumes,
            or as :func:`medfuse.fuse` (an unknown method or option...).
        GeometryError: the volumes are not on one grid (a replaced resample step).
        MissingDependencyError, WeightsError, FusionError: the network cannot run (torch, the inference module or
            the weights missing, or a failure of the network itself) and ``fallback`` names no classical method;
            FusionError also when the fusion returns an image of another shape.
        CancelledError: ``state.cancel`` was set.
    """

    name = "fuse"

    def __init__(self, method: str = "network", *, device: str = "cpu", fallback: Optional[str] = None, **options: Any):
        from .fusion.device import check_network_device

        # A typo fails here, before loading and registration; a wrong device is the caller's mistake, not "the
        # network cannot run": no fallback hides it.
        # Lower-cased: "Network" runs the network, so it must fall back and be recorded as the network too.
        method = _fusion_method(method)
        if fallback is not None:
            fallback = _fusion_method(fallback, what="fallback method", classical=True)
        check_network_device(method, device)
        given = sorted({"progress", "cancel"} & set(options))
        if given:  # the run's own callbacks reach the fusion; a second pair here would clash with them
            raise InvalidInputError(f"FuseStep takes no {' or '.join(given)} option",
                                    fix="give progress= and cancel= to Pipeline.run (or fuse_files); they reach the fusion")
        if method == "network" and options.get("weights") is not None:
            from .fusion.infer import check_weights_file

            check_weights_file(options["weights"])  # missing or corrupt: the caller's mistake, never a fallback
        self.method, self.device, self.fallback, self.options = method, device, fallback, options
        self.params = {"method": method, "device": device, "fallback": fallback, **options}

    def __call__(self, state: PipelineState) -> PipelineState:
        check(state.cancel, "fusion")
        if len(state.volumes) < 2:
            raise InvalidInputError(f"fusion needs at least two volumes, got {len(state.volumes)}",
                                    fix="give a fixed and at least one moving image")
        method = self.method
        report(state.progress, 0.0, f"fusing ({method})")

        def sub(f: float, msg: str = "") -> None:
            # The fusion's own words after the step's (a rule says "fusing (gff)" itself: not twice).
            said = msg if msg.startswith("fusing") else f"fusing ({method})" + (f": {msg}" if msg else "")
            report(state.progress, f, said)

        # The fusion's own progress and cancel: without them a Ctrl-C (or a batch's SIGTERM) waited for the whole
        # network fusion, tens of seconds at clinical size, and the bar sat at "fusing".
        calls = {"progress": sub, "cancel": state.cancel}
        try:
            fused = _fuse(state.volumes, method=method, device=self.device, **self.options, **calls)
        except Exception as e:  # noqa: BLE001 - re-raised below unless the documented fallback applies
            user_weights = self.options.get("weights") is not None
            if not (method == "network" and self.fallback and _fusion_unavailable(e, user_weights=user_weights)):
                raise
            reason = e.one_line() if isinstance(e, MedfuseError) else f"{e.__class__.__name__}: {e}"
            msg = f"the fusion network is not available ({reason}); fell back to method '{self.fallback}'"
            warnings.warn(msg, MedfuseWarning, stacklevel=2)
            state.notes["fallback"] = {"requested": "network", "used": self.fallback, "reason": reason}
            state.notes.setdefault("warnings", []).append(msg)
            method = self.fallback
            fused = _fuse(state.volumes, method=method, device=self.device, **_fallback_options(method, self.options),
                          **calls)
        if method == "network":
            state.weights_sha256 = _weights_sha256(self.options.get("weights"))
            # Which 3-D path ran: the coarse pixel rule serves functional (PET/SPECT) or unknown inputs.
            state.notes["network_functional"] = (getattr(fused, "provenance", None) or {}).get("network_functional")
            state.notes["network_path"] = (getattr(fused, "provenance", None) or {}).get("network_path")
            state.notes["network_threads"] = (getattr(fused, "provenance", None) or {}).get("network_threads")
        # The fusion's own warnings (anisotropic voxels, two patients) reach the sidecar as the steps' do: they
        # went to stderr only, so a batch report or a sidecar read later did not show them.
        said = [w for w in (getattr(fused, "provenance", None) or {}).get("warnings", [])
                if not any(w in (v.provenance.get("warnings") or []) for v in state.volumes)]
        if said:
            known = state.notes.setdefault("warnings", [])
            known.extend(w for w in said if w not in known)
        state.notes["method_used"] = method
        # What ran, not what was asked: a classical rule (a fallback too) runs on the CPU whatever the device.
        state.notes["device_used"] = _device_used(method, self.device)
        fused = _as_fused_volume(fused, state.volumes[0])
        fused.provenance["method"] = method
        if state.weights_sha256:
            fused.provenance["weights_sha256"] = state.weights_sha256
        state.fused = fused
        report(state.progress, 1.0, "fused")
        return state


def _fallback_options(method: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    """The options of a network FuseStep that the fallback rule ``method`` understands (and ``normalise``).

    Why: the network's own options (``weights=``, ``batch_size``, ``functional``...) went to the rule as well, so
    the fallback for missing weights failed with "weights must be 2 non-negative numbers" (the mean rule's
    ``weights``) or "option(s) batch_size not understood".
    """
    from .fusion.classical import _OPTIONS

    # ``weights`` of a network step names the weights file, never the rule's blend weights.
    return {k: v for k, v in options.items() if k == "normalise" or (k in _OPTIONS[method] and k != "weights")}


def _device_used(method: str, device: Any) -> Optional[str]:
    """The device the fusion ran on (:func:`medfuse.fusion.device.device_used`); None when it cannot be told."""
    try:
        from .fusion.device import device_used
        return device_used(method, device)
    except (ImportError, MedfuseError):  # the fusion is done: a provenance field never fails it
        return None


def _fuse(volumes: Sequence[Volume], *, method: str, device: str, **options: Any):
    try:
        from .fusion import fuse
    except ImportError as e:
        raise MissingDependencyError(
            f"the fusion module could not be imported ({e.__class__.__name__}: {e})",
            fix="reinstall medfuse (pip install -e '.[all]')") from None
    return fuse(*volumes, method=method, device=device, **options)


def _network_weights(step: "FuseStep", weights: Any) -> None:
    """Give the fuse step ``step`` the network weights file ``weights`` (checked now, before any work).

    Raises:
        InvalidInputError: ``step`` runs a classical rule (they take no weights file), or ``weights`` is not a path.
        WeightsError: the file is missing or unreadable.
    """
    if step.method != "network":
        raise InvalidInputError(f"weights= names the fusion network's weights file, but method is {step.method!r}, "
                                "a classical rule that takes none",
                                fix="drop weights=, or use method='network'")
    from .fusion.infer import check_weights_file

    check_weights_file(weights)  # a typed error for a missing, corrupt or non-path file now, not after registration
    path = os.fspath(weights)  # JSON-safe in the recorded parameters
    step.options["weights"] = path
    step.params["weights"] = path


def _weights_sha256(weights: Any = None) -> Optional[str]:
    """The hash of the weights that ran (the shipped file unless ``weights=`` named others), or None when it
    cannot be read (one rule with ``medfuse.fuse``'s provenance)."""
    from .fusion import _weights_hash

    return _weights_hash(weights)


def _as_fused_volume(fused: Any, ref: Volume) -> Volume:
    if isinstance(fused, Volume):
        return fused
    arr = np.asarray(fused)
    if arr.shape != ref.shape:
        raise FusionError(f"fusion returned shape {arr.shape}, expected {ref.shape}",
                          fix="report this as a bug in the fusion method")
    return ref.with_array(arr.astype(np.float32), modality="unknown", unit="arbitrary")


class SaveStep:
    """Write the fused volume atomically, then its provenance sidecar; skipped when there is no output.

    The output is written to a temporary name, hashed, the sidecar written, and only then renamed into
    place: a run killed at any moment leaves no new output (a first write: at most the sidecar marked
    ``in_progress``, beside no output), or an output with a matching sidecar, or (killed while replacing an
    earlier output) the earlier output with a sidecar that says medfuse was replacing it. The image's name, not
    the sidecar's, says that an output is complete.
    Before writing, a sidecar marked ``in_progress`` records the output's current hash (``replaces_sha256``),
    once; the sidecar written before the rename keeps ``replaces_sha256``. A batch rerun takes such an output as
    medfuse's own, unfinished, and redoes it without ``overwrite``. The temporary files a killed run left (the
    output's and the sidecar's) are named after their targets, and the next write to each removes them
    (:func:`medfuse.io._atomic.stale_temporaries`); sidecars of older versions named the output's in ``writing``.

    Args:
        deidentify: (keyword-only) as :func:`medfuse.save`'s, for a DICOM output: ``False`` keeps the DICOM
            fixed series' patient and study (see :class:`Pipeline`); recorded in ``params`` only then.

    Raises:
        InvalidInputError: ``deidentify`` not a bool.
    """

    name = "save"

    def __init__(self, *, deidentify: bool = True):
        from ._checks import flag

        self.deidentify = flag(deidentify, "deidentify")
        # Recorded only when the identity is kept: earlier sidecars and batch reports hold save's {} unchanged.
        self.params: Dict[str, Any] = {} if self.deidentify else {"deidentify": False}

    def __call__(self, state: PipelineState) -> PipelineState:
        if state.output is None or state.fused is None:
            return state
        from . import provenance as prov

        from .io._atomic import folder_lock

        out = Path(state.output)
        inputs = [p for p in state.inputs if not isinstance(p, Volume)]
        name = out.name.lower()
        check(state.cancel, "saving")
        if not self.deidentify:
            _refuse_other_patients(state.volumes)
        _input_facts(state)  # the inputs hashed now, not while the folder is locked (once per run: kept)
        # One save of an output folder at a time, across processes: two runs writing one output at once each
        # wrote their sidecar before one rename won, and the sidecar left could describe the other image.
        with folder_lock(out.parent):
            _remove_interrupted_temp(out)
            replaces = _hash_if_there(out)
            previous = _bytes_if_there(prov.sidecar_path(out))
            try:
                return self._save(state, out, inputs, name, replaces)
            except BaseException as e:
                # A save that failed (not killed) left the earlier output in place: its own sidecar goes back
                # too. First the writer's frames go: its open file on the deleted temporary held the space of a
                # full disk, and the sidecar could not go back.
                _release_frames(e)
                _put_back_sidecar(out, previous, replaces)
                raise

    def _save(self, state, out, inputs, name, replaces) -> PipelineState:
        from . import provenance as prov
        from .io import save
        from .io._atomic import atomic_dir, atomic_path

        if name.endswith((".mhd", ".nhdr")):
            # Header + data file pairs name each other: let the writer place both atomically, then add
            # the sidecar. The in-progress sidecar first: a kill between the two leaves a new output that no
            # finished sidecar verifies, which a batch rerun redoes instead of refusing it.
            if state.overwrite or not (out.exists() or out.is_symlink()):
                self._in_progress(state, out, inputs, replaces)
            save(state.fused, out, overwrite=state.overwrite)
            state.notes["provenance"] = self._sidecar(state, out, out, inputs)
            return state
        ctx = atomic_path if name.endswith(prov._IMAGE_SUFFIXES) else atomic_dir
        if state.overwrite or not (out.exists() or out.is_symlink()):
            # Claimed once, before the temporary file exists: the temporary file needs no record, its name says
            # which output it is for (a kill leaves it for the next write of ``out`` to remove).
            self._in_progress(state, out, inputs, replaces)
        # A DICOM output lies on the first input's grid: a DICOM first input is its template (study, frame of
        # reference, patient position; de-identified as save's default does).
        template = _dicom_series_of(state.inputs[0]) if ctx is atomic_dir and state.inputs else None
        ref = state.volumes[0].provenance if template is not None and state.volumes else {}
        if ref.get("series_uid"):
            from .io.dicom_writer import _read_template

            # The fixed series chosen in a folder of several (--series CT PT): the fused volume names no series,
            # and the folder's first file was taken, another series' patient, study and frame of reference.
            template = _read_template(template, str(ref["series_uid"]),
                                      str(ref.get("frame_of_reference_uid") or "") or None)
        with ctx(out, overwrite=state.overwrite, inputs=inputs) as tmp:
            save(state.fused, tmp, overwrite=True, template=template, deidentify=self.deidentify)
            state.notes["provenance"] = self._sidecar(state, tmp, out, inputs, replaces=replaces, before_rename=True)
        return state

    def _in_progress(self, state, out, inputs, replaces) -> None:
        """Mark the sidecar: medfuse is writing ``out`` (replacing the output of hash ``replaces``)."""
        from . import provenance as prov

        record = _provenance(state, extra_step={"name": self.name, "params": {}, "seconds": None})
        record["output"] = {"path": os.fspath(out), "sha256": None, "in_progress": True,
                            "replaces_sha256": replaces}
        prov.write_sidecar(out, record, input_paths=inputs)

    def _sidecar(self, state, written, out, inputs, replaces=None, before_rename=False) -> dict:
        """Hash what was written and put the provenance sidecar beside ``out``; returns the record."""
        from . import provenance as prov

        state.output_sha256 = prov.hash_path(written)
        state.sidecar = prov.sidecar_path(out)
        record = _provenance(state, extra_step={"name": self.name, "params": {}, "seconds": None})
        if before_rename:
            # Written before the rename: a kill in between leaves the earlier output (of hash ``replaces``) in
            # place, and the temporary file, which the next write of ``out`` removes.
            record["output"].update(replaces_sha256=replaces)
        prov.write_sidecar(out, record, input_paths=inputs)
        return record


#: A file at the sidecar path larger than this is no sidecar (they are kilobytes): it is not read into memory to be
#: put back, only recognised by its identity (a 400 MB file was held through the whole save).
_SIDECAR_MAX_BYTES = 1 << 22


def _patient_key_here(v: Volume) -> Optional[str]:
    """``v``'s patient key as this process salts it: a Volume loaded in another process (pickled, a Dask worker's)
    carries a key no key of this process can be compared with, so its series' header is read again; None when
    there is none (not DICOM, de-identified, unreadable now).

    Why: such a fixed Volume took another patient's series into its patient's study without a word, the keys
    being incomparable and so "not disagreeing".
    """
    from ._patient import _parts, patient_key

    key = v.provenance.get("patient_key")
    if not key or _parts(key) is not None:
        return key or None
    source = v.provenance.get("source")
    if v.provenance.get("reader") != "medfuse.dicom" or not isinstance(source, str) or not os.path.exists(source):
        return None
    from .io.dicom_writer import _read_template

    try:
        ds = _read_template(source, str(v.provenance.get("series_uid") or "") or None)
    except MedfuseError:
        return None
    return patient_key(ds) if ds is not None else None


def _refuse_other_patients(vols: Sequence[Volume], *, warn_unknown: bool = False) -> None:
    """Refuse to file a result made of several patients' series into the fixed series' patient's study.

    Stricter than the warning a de-identified fusion gets (the ID and the name both differ): any identifier both
    series hold that differs (two patients of one name, MRN1 and MRN2, are two patients). With ``warn_unknown``,
    a moving image that carries no patient identity (a NIfTI, a de-identified series) is warned of.

    Why: with the identity kept, a warning was all there was, and a PET of another patient went into this patient's
    record under their name; de-identified, the result names no one, and the warning stays a warning.

    Raises:
        InvalidInputError: a moving series' patient ID, name or birth date differs from the fixed series'.
    """
    from ._patient import keys_disagree

    key = _patient_key_here(vols[0])
    if warn_unknown and not key:
        warnings.warn("the fixed image carries no patient identity (a de-identified series), so the result kept in "
                      "its study names no patient either", MedfuseWarning, stacklevel=user_stacklevel())
    for i, v in enumerate(vols[1:], start=2):
        theirs = _patient_key_here(v)
        if keys_disagree(key, theirs):
            raise InvalidInputError(f"input {i} is a DICOM series of another patient than the fixed series (their "
                                    "patient ID, name or birth date differ; the values are not shown): a result "
                                    "kept in the fixed series' patient's study would file another patient's images "
                                    "under their name",
                                    fix="check the series; to look at the result anyway, write it de-identified (the "
                                        "default)")
        if warn_unknown and key and not theirs:
            msg = (f"input {i} carries no patient identity (not DICOM, or de-identified), so nothing shows it is "
                   "the fixed series' patient's, in whose study the result is kept: check that it is")
            warnings.warn(msg, MedfuseWarning, stacklevel=user_stacklevel())


def _bytes_if_there(path: Path) -> Optional[Tuple[Tuple[int, ...], Optional[bytes]]]:
    """The file at ``path``: its identity (device, inode, size, mtime) and its bytes (any file, not only UTF-8
    text: what is put back must be what was there; None when it is too large to be a sidecar); None when there
    is no file."""
    try:
        ident = _identity(path) if path.is_file() else None
        if ident is None:
            return None
        return ident, (path.read_bytes() if ident[2] <= _SIDECAR_MAX_BYTES else None)
    except OSError:
        return None


def _release_frames(e: BaseException) -> None:
    """Clear the finished frames of ``e``'s tracebacks (and of its cause and context): what they hold, such as a
    writer's open file on a deleted temporary (which keeps its disk space), is released now, not at exit."""
    import traceback

    seen = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        traceback.clear_frames(x.__traceback__)
        todo += [x.__cause__, x.__context__]


def _put_back_sidecar(out: Path, previous: Optional[Tuple[Tuple[int, ...], Optional[bytes]]],
                      replaces: Optional[str]) -> None:
    """After a failed save: the sidecar as it was, when the output is still the one it was (best effort, with a
    warning when it cannot be done: the sidecar then says medfuse was replacing the output, and a rerun redoes it)."""
    from .io._atomic import atomic_write_bytes
    from .provenance import sidecar_path

    if _hash_if_there(out) != replaces:
        return  # the new output is in place (or something else is): its sidecar stays
    side = sidecar_path(out)
    now = _identity(side)
    if previous is not None and now == previous[0]:
        # Untouched (a run refused before writing it): left as it is. A file there that was no UTF-8 text (an
        # input linked under the sidecar's name) was deleted as "no sidecar was there".
        return
    try:
        if previous is not None and previous[1] is not None:
            atomic_write_bytes(side, previous[1], overwrite=True)
        elif previous is not None:
            raise OSError("the file there was too large to keep a copy of")
        elif side.is_file():
            # No sidecar was there: none is left (the in-progress one this run wrote), whether or not an output
            # of the user's was being replaced (its own sidecar-less state is what it was).
            side.unlink()
    except (OSError, MedfuseError) as e:
        warnings.warn(f"{side}: the earlier output was kept, but its provenance sidecar could not be put back "
                      f"({type(e).__name__}); it now says medfuse was replacing the output, and a rerun with the same "
                      "command redoes it", MedfuseWarning, stacklevel=3)


def _identity(path: Path) -> Optional[Tuple[int, ...]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _hash_if_there(out: Path) -> Optional[str]:
    """The hash of the output about to be replaced, or None when there is none (or it cannot be read)."""
    from .errors import UnreadableFileError
    from .provenance import hash_path

    if not out.exists():
        return None
    try:
        return hash_path(out)
    except UnreadableFileError:
        return None


def _remove_interrupted_temp(out: Path) -> None:
    """Remove the temporary file (or folder) a killed save of an older medfuse version left beside ``out``, as
    its in-progress sidecar names it (``writing``). Only a medfuse temporary name in ``out``'s own folder is ever
    removed. This version's sidecars have no ``writing``: its temporary names say their target, and the next
    write to it removes them (:func:`medfuse.io._atomic.stale_temporaries`)."""
    import shutil

    from .io._atomic import _TMP_NAME, _TMP_PREFIX
    from .provenance import is_medfuse_record, read_sidecar

    rec = read_sidecar(out)
    recorded = rec.get("output") if is_medfuse_record(rec) and isinstance(rec.get("output"), Mapping) else {}
    if "writing" not in recorded:
        return  # written by this version (or not in progress)
    writing = recorded.get("writing")
    if isinstance(writing, str) and _TMP_NAME.fullmatch(writing):
        return  # a name of this version's scheme: removed by the write itself only when its writer has ended
    if writing is None and recorded.get("in_progress") is True:
        _remove_empty_temps_since_claim(out)
        return
    if not (isinstance(writing, str) and writing.startswith(_TMP_PREFIX) and os.path.basename(writing) == writing):
        return
    left = out.parent / writing
    try:
        if left.is_dir() and not left.is_symlink():
            shutil.rmtree(left)
        elif left.exists() or left.is_symlink():
            left.unlink()
    except OSError:
        pass  # a leftover that cannot be removed is harmless: hidden, and skipped by hashing and discovery


def _remove_empty_temps_since_claim(out: Path) -> None:
    """Remove the empty medfuse temporary files (of ``out``'s suffix) made beside ``out`` after its in-progress
    sidecar was written: a save killed before it named its temporary file left one (nothing had been written to
    it yet)."""
    from .io._atomic import _TMP_NAME, _TMP_PREFIX, _temp_suffix
    from .provenance import sidecar_path

    try:
        claimed = sidecar_path(out).stat().st_mtime_ns
        entries = list(os.scandir(out.parent))
    except OSError:
        return
    suffix = _temp_suffix(out.name)
    for e in entries:
        try:
            # Only older versions' names: this version's name their target and writer, and may be a live one's.
            if (e.name.startswith(_TMP_PREFIX) and not _TMP_NAME.fullmatch(e.name) and e.name.endswith(suffix)
                    and e.is_file(follow_symlinks=False)
                    and e.stat(follow_symlinks=False).st_size == 0
                    and e.stat(follow_symlinks=False).st_mtime_ns >= claimed):
                os.unlink(e.path)
        except OSError:
            continue


# ----------------------------------------------------------------------------- pipeline
def _input_facts(state: PipelineState) -> List[Dict[str, Any]]:
    from .provenance import hash_path

    facts = []
    hashes = state.notes.setdefault("_input_sha256", {})  # hash each input once per run
    kept = state.notes.get("_original_facts")  # set when the originals were released (see _release_originals)
    for i, item in enumerate(state.inputs):
        f: Dict[str, Any] = {"role": "fixed" if i == 0 else "moving"}
        if isinstance(item, Volume):
            f.update(path=None, sha256=None)
        else:
            key = os.fspath(item)
            if key not in hashes:
                hashes[key] = hash_path(item)
            f.update(path=key, sha256=hashes[key])
        if kept is not None:
            if i < len(kept) and kept[i] is not None:
                f.update(kept[i])
        elif i < len(state.originals):
            f.update(_volume_facts(state.originals[i]))
        facts.append(f)
    return facts


def _volume_facts(v: Volume) -> Dict[str, Any]:
    """What the provenance records about an input as loaded: with the SUV kind and its rule for a PET and its
    tracer and uptake time (no dates; no injected dose beside the SUV factor), and the volume of a 4-D file or
    series (which one was used was recorded nowhere)."""
    facts = dict(modality=v.modality, unit=v.unit, shape=list(v.shape),
                 spacing_mm=[round(s, 6) for s in v.spacing], orientation=v.orientation)
    keys = ("suv", "suv_source", "suv_factor", "pet_acquisition") + (
        ("volume_index", "n_volumes") if (v.provenance.get("n_volumes") or 1) > 1 else ())
    for key in keys:
        if v.provenance.get(key) is not None:
            facts[key] = v.provenance[key]
    from .provenance import for_sidecar

    facts = for_sidecar(facts)  # no injected dose beside the SUV factor (the two give the weight back)
    facts.update(_series_facts(v))
    return facts


def _series_facts(v: Volume) -> Dict[str, Any]:
    """Which DICOM series an input was: its SeriesNumber and the SHA-256 of its SeriesInstanceUID, for a reader of
    the sidecar to tell which of a folder's series was fused (``"series": ["5", "PT"]`` names a position in a
    listing, whose order changed with the files' names before medfuse listed series by SeriesNumber). Neither the
    UID itself (UIDs trace back to the study) nor the description (free text that may name the patient or a
    physician) is recorded."""
    import hashlib

    prov = v.provenance
    if prov.get("reader") != "medfuse.dicom":
        return {}
    out: Dict[str, Any] = {}
    if prov.get("series_number"):
        out["series_number"] = str(prov["series_number"])
    uid = str(prov.get("series_uid") or "")
    if uid and uid != "unknown":
        out["series_uid_sha256"] = hashlib.sha256(uid.encode()).hexdigest()  # whole: scrub leaves digests alone
    return out


#: The built-in steps that never read ``state.originals`` (after the resample step, the inputs as loaded may go).
_ORIGINALS_UNUSED = (NormaliseStep, FuseStep, SaveStep)


def _release_originals(state: PipelineState, later: Sequence[Step]) -> None:
    """Drop the pipeline's references to the inputs as loaded once only built-in steps that never read them
    follow, keeping the facts the provenance records about them.

    Each input as loaded would otherwise stay in memory through normalisation and fusion (the peak) beside
    its resampled and normalised copies: a CT in int16 and a PET as loaded, for nothing. A custom later step
    may read ``state.originals``: then they are kept.
    """
    if not state.originals or not all(type(s) in _ORIGINALS_UNUSED for s in later):
        return
    state.notes["_original_facts"] = [_volume_facts(v) for v in state.originals]
    state.originals = []


def _provenance(state: PipelineState, *, extra_step: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from .provenance import build

    steps = list(state.steps) + ([extra_step] if extra_step else [])
    regs = state.registrations if any(r is not None for r in state.registrations) else None
    extra = {k: v for k, v in state.notes.items() if k in ("warnings", "fallback", "method_used", "device_used",
                                                             "network_functional", "network_path",
                                                             "network_threads", "normalisation",
                                                             "normalisation_unused", "comparability")}
    return build(
        inputs=_input_facts(state), output=state.output, output_sha256=state.output_sha256, steps=steps,
        parameters=state.notes.get("parameters"), registration=regs, weights_sha256=state.weights_sha256,
        extra=extra,
    )


class Pipeline:
    """load -> register -> resample -> normalise -> fuse -> save, every step replaceable.

    Args:
        register: registration kind (``None``, ``"rigid"``, ``"affine"``, ``"deformable"``) for the default
            register step.
        method: fusion method for the default fuse step.
        device: ``"cpu"`` or ``"cuda"``.
        fallback: classical method used when the network cannot run (``None``: fail).
        threads: ITK threads for registration (``None``: SimpleITK's default). ``1`` for bit-identical
            re-runs (more threads may differ in the last digits, see :class:`RegisterStep`).
        grid: ``"fixed"`` or ``"finest"`` (see :class:`ResampleStep`).
        normalise: ``"auto"`` (by modality), ``"percentile"``, ``"minmax"`` or ``"none"`` (the volumes are fused
            as they are, so they must be in 0..1 already: values above 1 are refused by the fusion).
        ct_window: ``(level, width)`` in HU, the window a CT in HU is mapped from onto 0..1 (default (40, 400));
            ``normalise="auto"`` only (see :class:`NormaliseStep`).
        suv_range: ``(low, high)`` in SUV, the interval a PET in SUV is mapped from (default 0 to 10);
            ``normalise="auto"`` only (see :class:`NormaliseStep`).
        modalities: modality override per input (NIfTI files carry none).
        series: series choice per input, for DICOM folders holding several series (see :class:`LoadStep`).
        suv: how a DICOM PET is read, as :func:`medfuse.load` takes it (``"auto"``, ``"bw"``, ``"lbm"``,
            ``"lbm_janma"``, ``"bsa"``, ``"none"``); ``None`` (default): SUVbw (a stored SUV of another kind is
            converted to it where the header allows, else kept as stored).
        body: a DICOM PET's weight, height and sex in place of its header's, for SUV (see :class:`LoadStep`).
        steps: replace default steps by name: ``{"normalise": my_step}``; a step is any callable
            ``step(state) -> state`` (a ``params`` attribute, if present, is recorded).
        deidentify: ``False`` keeps the fixed DICOM series' patient and study in a DICOM output (names, IDs, the
            study and frame-of-reference UIDs), so that a PACS files the result into the patient's own study;
            ``True`` (default) de-identifies it (:func:`medfuse.save`). ``False`` needs a DICOM output and a
            DICOM fixed image (refused before any work otherwise). Sidecars, logs and messages never hold the
            identifiers either way.

    Raises:
        InvalidInputError: an unknown ``register`` kind, fusion ``method``, ``grid``, ``normalise`` method or
            ``device`` (or a GPU this machine lacks, for every method), a ``fallback`` that is no classical method,
            ``threads`` not a whole number of 1 or more, ``ct_window`` or ``suv_range`` as
            :class:`NormaliseStep` refuses them, ``modalities`` or ``series`` not a list (one entry per
            input), a ``series`` choice that is neither text nor a number, ``steps`` not a dict, a ``steps``
            entry that names no step or is not callable, ``deidentify`` not a bool, or a ``body`` that
            :func:`medfuse.load` refuses. What running it raises:
            see :meth:`run`.
    """

    def __init__(self, *, register: Optional[str] = None, method: str = "network", device: str = "cpu",
                 fallback: Optional[str] = None, threads: Optional[int] = None, grid: str = "fixed",
                 normalise: str = "auto", modalities: Optional[Sequence[Optional[str]]] = None,
                 series: Optional[Sequence[Optional[str]]] = None, steps: Optional[Dict[str, Step]] = None,
                 deidentify: bool = True, suv: Optional[str] = None,
                 ct_window: Optional[Tuple[float, float]] = None, suv_range: Optional[Tuple[float, float]] = None,
                 body: Optional[Mapping[str, Any]] = None):
        self._steps: List[Tuple[str, Step]] = [
            ("load", LoadStep(modalities=modalities, series=series, suv=suv, body=body)),
            ("register", RegisterStep(register, threads=threads)),
            ("resample", ResampleStep(grid=grid)),
            ("normalise", NormaliseStep(method=normalise, ct_window=ct_window, suv_range=suv_range)),
            # "none" reaches the fusion too: it used to skip only this step, and medfuse.fuse then scaled by
            # modality anyway (a CT in HU scaled to 0..1 upstream got the soft-tissue window a second time).
            ("fuse", FuseStep(method, device=device, fallback=fallback,
                              **({"normalise": "none"} if normalise == "none" else {}))),
            ("save", SaveStep(deidentify=deidentify)),
        ]
        if steps is not None and not isinstance(steps, Mapping):
            raise InvalidInputError(f"steps must be a dict of step name to callable, got {describe(steps)}",
                                    fix="pass e.g. steps={'normalise': my_step}, or use Pipeline().replace(name, step)")
        for name, step in (steps or {}).items():
            self._set(name, step)

    def _set(self, name: str, step: Step) -> None:
        names = [n for n, _ in self._steps]
        if not isinstance(name, str) or name not in names:
            # A step name is the caller's code, not patient data: shown when it is short text.
            shown = repr(name) if isinstance(name, str) and len(name) <= 40 and name.isidentifier() else describe(name)
            raise InvalidInputError(f"unknown pipeline step {shown}",
                                    fix=f"use one of {', '.join(names)}")
        if not callable(step):
            raise InvalidInputError(f"the {name} step must be callable: step(state) -> state",
                                    fix="pass a function or an object with __call__")
        self._steps[names.index(name)] = (name, step)

    def replace(self, name: str, step: Step) -> "Pipeline":
        """A copy of this pipeline with step ``name`` replaced by ``step`` (this pipeline is left as it is).

        Args:
            name: the step to replace: ``"load"``, ``"register"``, ``"resample"``, ``"normalise"``, ``"fuse"`` or
                ``"save"``.
            step: any callable ``step(state) -> state`` (a ``params`` attribute, if present, is recorded).

        Returns:
            The new :class:`Pipeline`.

        Raises:
            InvalidInputError: ``name`` names no step, or ``step`` is not callable.
        """
        new = Pipeline.__new__(Pipeline)
        new._steps = list(self._steps)
        new._set(name, step)
        return new

    @property
    def steps(self) -> List[Tuple[str, Step]]:
        """``[(name, step), ...]`` in order."""
        return list(self._steps)

    def step(self, name: str) -> Step:
        """The step called ``name`` (``"load"``, ``"register"``, ``"fuse"``...), to read or change its options.

        Args:
            name: the step's name, as :attr:`steps` lists it.

        Returns:
            The step itself (not a copy): a change to its options applies to this pipeline's next runs.

        Raises:
            InvalidInputError: the pipeline has no step of that name (the message lists its steps).
        """
        steps = dict(self._steps)
        if not isinstance(name, str) or name not in steps:
            raise InvalidInputError(f"this pipeline has no step {name!r}",
                                    fix=f"use one of its steps: {', '.join(steps) or 'none yet'}")
        return steps[name]

    def parameters(self) -> Dict[str, Any]:
        """Every step's recorded parameters (what decides the result; used for idempotent re-runs)."""
        return {name: _params_of(step) for name, step in self._steps if name != "save"}

    def run(self, inputs: Sequence[Union[PathLike, Volume, Any]], out: Optional[PathLike] = None, *,
            overwrite: bool = False, progress: Optional[ProgressFn] = None,
            cancel: Optional[CancelToken] = None) -> PipelineResult:
        """Run the steps on ``inputs`` (fixed first) and write ``out`` with its sidecar when given.

        Inputs are paths, Volumes, or MONAI MetaTensors (converted with :meth:`Volume.from_metatensor`).

        Args:
            inputs: two or more images, fixed first: file or DICOM folder paths, Volumes or MetaTensors.
            out: the output file (its format from the ending; no ending: a DICOM series folder), written with a
                JSON provenance sidecar beside it; None: nothing is written (the result holds the fused Volume).
            overwrite: replace an existing output and sidecar (never one of ``inputs``).
            progress, cancel: see :mod:`medfuse.progress` (progress over the whole run, step by step).

        Returns:
            A :class:`PipelineResult`: the fused Volume, the output and sidecar paths written (None without
            ``out``), the provenance record, the registrations and transforms, and each step's timing.

        Raises:
            InvalidInputError: ``inputs`` not a list of at least two images (a single path, Volume, array, number or
                None), an input that is not a path, Volume or MetaTensor, an ``out`` that is not a path,
                ``progress`` not callable or ``cancel`` not a CancelToken.
            MedfuseError: any documented failure of a step (bad input, registration, fusion, output exists).
            CancelledError: ``cancel`` was set.
        """
        check_callbacks(progress, cancel)
        if isinstance(inputs, (str, os.PathLike, Volume)):
            raise InvalidInputError("the pipeline needs a fixed and at least one moving input, got 1",
                                    fix="pass [fixed, moving, ...]")
        inputs = as_list(inputs, problem="inputs must be a list of images, fixed first",
                         fix="pass [fixed, moving, ...], each a file or DICOM folder path, a medfuse Volume or a "
                             "MONAI MetaTensor")
        if len(inputs) < 2:
            raise InvalidInputError(f"the pipeline needs a fixed and at least one moving input, got {len(inputs)}",
                                    fix="pass [fixed, moving, ...]")
        inputs = [_as_input(x, i) for i, x in enumerate(inputs)]
        keep_identity = False
        if out is not None:
            from .io.writers import check_save_target
            from .provenance import check_sidecar

            # Fail before hours of work, not after (every check save() makes at the end).
            check_save_target(out, overwrite=overwrite,
                              inputs=[p.provenance.get("source") if isinstance(p, Volume) else p for p in inputs])
            check_sidecar(out, overwrite=overwrite)
            save_step = dict(self._steps)["save"]
            if isinstance(save_step, SaveStep) and not save_step.deidentify:
                check_identity_kept(out, inputs[0])
                keep_identity = True
        _refuse_network_without_torch(self._steps)
        state = PipelineState(inputs=list(inputs), output=None if out is None else Path(out), overwrite=overwrite,
                              progress=None, cancel=cancel)
        state.notes["parameters"] = self.parameters()
        weights = dict(_STEP_WEIGHTS)
        step = dict(self._steps)["register"]
        if isinstance(step, RegisterStep) and step.kind is None:
            # Nothing to register: the bar jumped from 5 % to 65 % at once, then sat at 80 % through the fusion.
            weights["register"] = 0.0
        total = sum(weights.get(n, 0.05) for n, _ in self._steps)
        done = 0.0
        for k, (name, step) in enumerate(self._steps):
            w = weights.get(name, 0.05) / total
            state.progress = _scaled(progress, done, w, name)
            check(cancel, f"the {name} step")
            t0 = time.perf_counter()
            result = step(state)
            state = result if isinstance(result, PipelineState) else state
            if name == "load" and keep_identity:
                # Refused now, not after minutes of registration and fusion (the save step checks again).
                _refuse_other_patients(state.volumes, warn_unknown=True)
            if name == "resample" and keep_identity:
                # Refused before the fusion (the writer checks again): an input from another frame of reference
                # placed without a registration or transform would go out in the fixed series' frame.
                _refuse_unregistered_frames(state.volumes)
            state.steps.append({"name": name, "params": _params_of(step),
                                "seconds": round(time.perf_counter() - t0, 4)})
            done += w
            if name == "resample":
                _release_originals(state, [s for _, s in self._steps[k + 1:]])
            report(progress, done, f"{name} done")
        if state.fused is None:
            raise FusionError("the pipeline finished without a fused volume",
                              fix="a replaced fuse step must set state.fused")
        record = _provenance(state)
        if state.output is not None and state.sidecar is not None:
            # Refresh the sidecar with the save step's own timing (the output itself is untouched).
            from .provenance import write_sidecar

            write_sidecar(state.output, record, input_paths=[p for p in inputs if not isinstance(p, Volume)])
        return PipelineResult(fused=state.fused, output=state.output if state.sidecar else None,
                              sidecar=state.sidecar, provenance=record, registrations=state.registrations,
                              transforms=state.transforms, steps=state.steps)


def _dicom_series_of(item: Any) -> Optional[Path]:
    """The DICOM series an input is (a path) or was loaded from (a Volume medfuse read from DICOM), for a DICOM
    output's template; else None."""
    from .io import dicom_template

    if isinstance(item, Volume):
        prov = item.provenance
        return dicom_template(prov.get("source")) if prov.get("reader") == "medfuse.dicom" else None
    return dicom_template(item)


def _refuse_unregistered_frames(vols: Sequence[Volume]) -> None:
    """With the identity kept, refuse moving images (already on the fixed grid) that lie in another DICOM frame of
    reference than the fixed image and were placed without a registration or transform (see
    :func:`medfuse.io.dicom_writer.refuse_unregistered_frame`); nothing when the fixed frame is not known."""
    from .io.dicom_writer import refuse_unregistered_frame

    frame = vols[0].provenance.get("frame_of_reference_uid") if vols else None
    if not frame:
        return
    for i, v in enumerate(vols[1:], start=2):
        refuse_unregistered_frame(v, frame, what=f"input {i}")


def check_identity_kept(out: PathLike, fixed: Any, *, option: str = "deidentify=False") -> None:
    """Refuse, before any work, to keep the patient's identity where there is none to keep or no place for it.

    Why: a NIfTI output holds no patient module, and without a DICOM fixed series the DICOM output would get
    a new study and an empty patient: either way the wish to file the result back would fail unsaid.

    Args:
        out: the output path.
        fixed: the fixed input as given (a path, a Volume, ...).
        option: the option's name as the caller's user knows it (``--keep-identity`` on the command line).

    Raises:
        InvalidInputError: ``out`` is a file format that holds no identity, or ``fixed`` is no DICOM series.
    """
    from .io import is_image_file

    if is_image_file(out):
        raise InvalidInputError(f"{option} keeps the patient and study in a DICOM output, but the output is a "
                                f"{Path(out).name.split('.', 1)[-1]} file, which holds neither",
                                fix="name a DICOM output folder (a name without a file ending), or leave the "
                                    "output de-identified")
    if not isinstance(fixed, Volume) and not os.path.exists(fixed):
        return  # the loader says "no such file or folder", as it does without the option
    if _dicom_series_of(fixed) is None:
        raise InvalidInputError(f"{option} takes the patient and study from the fixed image, which is not a DICOM "
                                "series", fix="give the DICOM series the result belongs with as the fixed image, "
                                              "or leave the output de-identified")


def _refuse_network_without_torch(steps: Sequence[Tuple[str, Any]]) -> None:
    """Refuse a run whose fuse step needs the network (no fallback) where torch or safetensors is not installed.

    Why: the run loaded and registered first (20 s for ``--register rigid``) and failed only then. Checked when a
    run starts, not when the pipeline is built: a pipeline whose fuse step is replaced needs no torch.
    """
    import importlib.util

    fuse = dict(steps).get("fuse")
    if not isinstance(fuse, FuseStep) or fuse.method != "network" or fuse.fallback is not None:
        return
    for package in ("torch", "safetensors"):
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):  # a broken or stub module: its import fails with its own words
            found = True
        if not found:
            raise MissingDependencyError.for_package(package, "the fusion network", "ml")


def _as_input(item: Any, index: int) -> Union[PathLike, Volume]:
    """A path or Volume for the pipeline; a MONAI MetaTensor becomes a Volume (its geometry kept exactly). A path's
    leading ``~`` is expanded here, once, as ``medfuse.load`` expands it: loading took ``~/t1.nii.gz`` and hashing
    it for the sidecar then failed with "no such file"."""
    if isinstance(item, (str, os.PathLike)) and os.fspath(item).startswith("~"):
        return os.path.expanduser(os.fspath(item))
    if isinstance(item, (str, os.PathLike, Volume)):
        return item
    if hasattr(item, "affine") and hasattr(item, "meta"):
        return Volume.from_metatensor(item)
    raise InvalidInputError(
        f"input {index + 1} is {describe(item)}, not a path, medfuse Volume or MONAI MetaTensor",
        fix="pass a file or DICOM folder path, or wrap the array with its geometry: medfuse.Volume(array, affine)")


_STEP_WEIGHTS = {"load": 0.05, "register": 0.6, "resample": 0.1, "normalise": 0.05, "fuse": 0.15, "save": 0.05}


def _scaled(progress: Optional[ProgressFn], start: float, width: float, name: str) -> Optional[ProgressFn]:
    if progress is None:
        return None

    def sub(f: float, msg: str = "") -> None:
        report(progress, start + width * min(1.0, max(0.0, f)), f"{name}: {msg}" if msg else name)

    return sub


def _params_of(step: Any) -> Dict[str, Any]:
    params = getattr(step, "params", None)
    if isinstance(params, dict):
        return dict(params)
    return {"callable": getattr(step, "__qualname__", type(step).__qualname__)}


class _itk_threads:
    """Temporarily set SimpleITK's global default thread count (no-op for None).

    The setting is process-wide, and MONAI runs transforms in threads (``CacheDataset(num_workers=...)``): the
    first context to enter saves the user's value and the last to leave restores it, whatever the order. A call
    asking for another count than the one set waits until the calls running with it are done (a thread already
    inside one does not wait): a ``threads=1`` registration ran with 4 threads beside a ``threads=4`` call, so it
    no longer repeated bit for bit, while its provenance said 1.
    """

    _cond = threading.Condition()
    _depth = 0
    _current: Optional[int] = None
    _saved: Optional[int] = None
    _mine = threading.local()

    def __init__(self, n: Optional[int]):
        self.n = n

    def __enter__(self):
        if self.n is not None:
            import SimpleITK as sitk

            n, cls = int(self.n), type(self)
            with cls._cond:
                inside = getattr(cls._mine, "depth", 0) > 0
                while cls._depth > 0 and cls._current != n and not inside:
                    cls._cond.wait()
                if cls._depth == 0:
                    cls._saved = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
                cls._depth += 1
                cls._current = n
                cls._mine.depth = getattr(cls._mine, "depth", 0) + 1
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
        return self

    def __exit__(self, *exc):
        if self.n is not None:
            import SimpleITK as sitk

            cls = type(self)
            with cls._cond:
                cls._depth -= 1
                cls._mine.depth -= 1
                if cls._depth == 0:
                    if cls._saved is not None:
                        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(cls._saved)
                    cls._saved = cls._current = None
                    cls._cond.notify_all()
        return False


def pipeline_parameters(*, register: Optional[str] = None, method: str = "network", device: str = "cpu",
                        fallback: Optional[str] = None, threads: Optional[int] = None, grid: str = "fixed",
                        normalise: str = "auto", series: Optional[Sequence[Optional[str]]] = None,
                        suv: Optional[str] = None, ct_window: Optional[Tuple[float, float]] = None,
                        suv_range: Optional[Tuple[float, float]] = None) -> Dict[str, Any]:
    """The parameters :func:`fuse_files` records for these options (batch uses it to decide re-runs).

    Args:
        register, method, device, fallback, threads, grid, normalise, series, suv, ct_window, suv_range: as
            :func:`fuse_files`.

    Returns:
        ``{step name: its recorded parameters}`` for every step but save, as the sidecar's ``parameters``.

    Raises:
        InvalidInputError: as :class:`Pipeline` (an unknown register kind, fusion method, grid, normalisation or
            device, a fallback that is no classical method, a series choice that is neither text nor a number, or
            a ct_window or suv_range :class:`NormaliseStep` refuses).
    """
    return Pipeline(register=register, method=method, device=device, fallback=fallback, threads=threads,
                    grid=grid, normalise=normalise, series=series, suv=suv, ct_window=ct_window,
                    suv_range=suv_range).parameters()


def fuse_files(fixed: Union[PathLike, Volume], moving: Union[PathLike, Volume, Sequence[Union[PathLike, Volume]]],
               out: Optional[PathLike], *, register: Optional[str] = None, method: str = "network",
               device: str = "cpu", overwrite: bool = False, fallback: Optional[str] = None,
               threads: Optional[int] = None, grid: str = "fixed", normalise: str = "auto",
               modalities: Optional[Sequence[Optional[str]]] = None, series: Optional[Sequence[Optional[str]]] = None,
               weights: Optional[PathLike] = None, progress: Optional[ProgressFn] = None,
               cancel: Optional[CancelToken] = None, deidentify: bool = True,
               suv: Optional[str] = None, ct_window: Optional[Tuple[float, float]] = None,
               suv_range: Optional[Tuple[float, float]] = None,
               body: Optional[Mapping[str, Any]] = None) -> PipelineResult:
    """Load, (register,) resample, normalise, fuse and save in one call, with a provenance sidecar.

    Args:
        fixed: the reference image (file, DICOM folder, Volume or MONAI MetaTensor); the output is on its grid.
        moving: one moving image or a list of them.
        out: output path (``.nii.gz``, ``.mha``, ``.nrrd``, or a folder name for DICOM); ``None`` keeps the
            result in memory.
        register: ``None`` (inputs already aligned), ``"rigid"``, ``"affine"`` or ``"deformable"``.
        method: ``"network"`` (default) or ``"mean"``, ``"max"``, ``"laplacian"``, ``"wavelet"``, ``"gff"``.
        device: ``"cpu"`` or ``"cuda"`` for the network.
        overwrite: replace an existing output (never an input).
        fallback: classical method to use if the network cannot run (``None``: fail).
        threads: ITK threads for registration; ``1`` for bit-identical re-runs (more threads may differ in
            the last digits).
        grid, normalise, modalities: see :class:`Pipeline` (``modalities``: one per input, fixed first, for
            files and in-memory images that carry none, e.g. ``["MR", "PT"]``; ``None`` keeps an input's own).
        series: one per input, fixed first, for DICOM folders that hold several series side by side (a PACS
            export of a PET/CT study): the series' number as listed, its modality, or its UID, e.g.
            ``fuse_files(study, study, out, series=["CT", "PT"])``; ``None`` or ``"-"`` for the others.
        weights: the fusion network's weights, a ``.safetensors`` file as :func:`medfuse.fuse` takes it (``None``:
            the shipped weights); ``method="network"`` only. Its SHA-256 is recorded in the provenance
            (``weights_sha256``), its path in the fuse step's parameters. Checked before any work: a missing file
            is a WeightsError even with a ``fallback`` (the fallback is for a network that cannot run, not for a
            mistyped file name).
        progress, cancel: progress callback and cancel token.
        deidentify: ``False`` keeps the fixed DICOM series' patient and study in a DICOM ``out`` (see
            :class:`Pipeline`); default ``True``, de-identified.
        suv: how a DICOM PET input is read (see :class:`Pipeline`), e.g. ``"lbm"`` for SUL (PERCIST).
        ct_window: ``(level, width)`` in HU mapped onto the fusion's 0..1 scale for a CT in HU, e.g.
            ``(400, 1800)`` for bone (default ``(40, 400)``); recorded in the normalise step's parameters.
        suv_range: ``(low, high)`` in the PET's SUV unit mapped onto 0..1 for a PET in SUV, e.g. ``(0, 5)`` to
            brighten a faint uptake (default 0 to 10, 0 to 2.5 for SUVbsa). Either applies to no other input; one
            that applies to none is named in the provenance's ``normalisation_unused``.
        body: the PET's weight, height and sex in place of its DICOM header's, for SUV (a header missing the
            weight, a weight entered wrongly, a child), as :func:`medfuse.load` takes it, e.g.
            ``{"weight_kg": 3.2, "height_m": 0.52, "sex": "M"}`` or any of the three. Given to the inputs that are
            DICOM PETs only (a warning when none is); the load step's parameters record which were given
            (``"body": ["weight_kg"]``), never the values.

    Returns:
        :class:`PipelineResult` (fused Volume, output and sidecar paths, provenance, registration reports).

    Raises:
        InvalidInputError: an option value :class:`Pipeline` refuses (a ``body`` as :func:`medfuse.load` refuses
            it: not a dict, an unknown key, an implausible weight or height), an empty ``moving`` list, an input that is
            not a path, Volume or MetaTensor, one :func:`medfuse.load` refuses (empty or all-NaN data), NaN
            voxels, an ``out`` that is not a path, or an output name or format the writer cannot take;
            ``weights`` not a path, or given with a classical ``method``; ``deidentify=False`` with an output
            that is not DICOM or a fixed image that is not a DICOM series.
        UnreadableFileError, UnsupportedDataError, MultipleSeriesError, GeometryError: an input cannot be loaded
            (as :func:`medfuse.load`; several series in a folder and ``series`` chooses none).
        OutputExistsError: ``out`` (or a file where its sidecar goes) exists without ``overwrite``, or is an
            input; checked before any work.
        OutputWriteError: ``out`` cannot be written (permission, read-only or full disk, a name too long, its
            folder missing); ``errno`` says which. Checked before any work where a probe write can tell.
        RegistrationError: registration cannot run on these images (constant image, no overlap, optimiser failure).
        MissingDependencyError, WeightsError, FusionError: the network cannot run (torch or the weights missing,
            or a failure of the network itself) and ``fallback`` is None. WeightsError also for a ``weights``
            file that is missing or unreadable, before any work, whatever ``fallback`` says.
        CancelledError: ``cancel`` was set.
    """
    movings = list(moving) if isinstance(moving, (list, tuple)) else [moving]
    if not movings:  # Pipeline.run's own message spoke of its inputs list, which fuse_files callers never see
        raise InvalidInputError("moving is an empty list: there is nothing to fuse with the fixed image",
                                fix="pass moving as one image (a path or Volume) or a list of at least one")
    pipe = Pipeline(register=register, method=method, device=device, fallback=fallback, threads=threads,
                    grid=grid, normalise=normalise, modalities=modalities, series=series, deidentify=deidentify,
                    suv=suv, ct_window=ct_window, suv_range=suv_range, body=body)
    if weights is not None:
        _network_weights(pipe.step("fuse"), weights)
    return pipe.run([fixed, *movings], out, overwrite=overwrite, progress=progress, cancel=cancel)
