"""Fusion of two or three co-registered images or volumes: one entry point, :func:`fuse`.

``method="network"`` runs the trained fusion network (:mod:`medfuse.fusion.infer`,
needs torch); the classical rules (:mod:`medfuse.fusion.classical`) need only
NumPy/SciPy/PyWavelets and serve as baselines and fallback. Nothing here
imports torch unless the network is asked for.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, overload

import numpy as np

from .._checks import all_finite, describe, unknown_choice, user_stacklevel
from ..errors import GeometryError, InvalidInputError, MedfuseError, MedfuseWarning, MissingDependencyError
from ..progress import CancelToken, ProgressFn, check, check_callbacks, report
from ..volume import Volume, require_finite
from .classical import METHODS as CLASSICAL_METHODS

__all__ = ["fuse", "available_methods", "CLASSICAL_METHODS"]


def available_methods() -> List[str]:
    """``["network", "mean", "max", "laplacian", "wavelet", "gff"]`` (the network listed even if torch is absent)."""
    return ["network", *CLASSICAL_METHODS]


def _network(arrays01: Sequence[np.ndarray], *, device: str, as_float64: bool = True, **options: Any) -> np.ndarray:
    """The network's fusion of ``arrays01``: float64 (``as_float64``), or the float32 array it returns, unconverted."""
    try:
        from . import infer
    except ImportError as e:
        missing = getattr(e, "name", "") or ""
        if missing.split(".")[0] == "torch":
            raise MissingDependencyError.for_package("torch", "the fusion network", "ml") from None
        # An ImportError subclass, so that callers with a classical fallback (the pipeline) use it.
        raise MissingDependencyError(
            f"the fusion network (medfuse.fusion.infer) cannot be imported ({type(e).__name__}: {e})",
            fix=f"use a classical method ({', '.join(CLASSICAL_METHODS)}) or reinstall medfuse with pip install 'medfuse[ml]'",
        ) from None
    import inspect

    allowed = set(inspect.signature(infer.fuse_arrays).parameters) - {"arrays", "device"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InvalidInputError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for the network",
                                fix=f"use only {', '.join(sorted(allowed))}")
    out = infer.fuse_arrays(list(arrays01), device=device, **options)
    return np.asarray(out, dtype=np.float64) if as_float64 else out


def _weights_hash(weights: Any = None) -> Any:
    """The sha256 of the weights that ran (the shipped file unless ``weights=`` named others)."""
    try:
        from .infer import weights_sha256

        return weights_sha256(weights)
    except Exception:  # noqa: BLE001 - a missing hash is recorded as null, never fatal
        return None


def _run(method: Any, arrays01: Sequence[np.ndarray], *, device: str, options: Dict[str, Any],
         network_float32: bool = False) -> np.ndarray:
    """``method``'s fusion of ``arrays01`` (a name, or a rule of the caller's: :func:`_call_rule`): float64; the
    network's float32 result as it is with ``network_float32``."""
    if isinstance(method, str) and method == "network":
        return _network(arrays01, device=device, as_float64=not network_float32, **options)
    from .classical import fuse_arrays

    options = dict(options)
    progress, cancel = options.pop("progress", None), options.pop("cancel", None)
    check(cancel, "fusion")
    report(progress, 0.0, f"fusing ({method if isinstance(method, str) else _rule_name(method)})")
    if callable(method):
        out = _call_rule(method, arrays01, options)
    else:
        out = fuse_arrays(list(arrays01), method=method, cancel=cancel, **options)
    report(progress, 1.0, "fused")
    return out


#: What provenance records as the ``method`` of a fusion by a rule of the caller's (a callable ``method``); its
#: name goes under ``custom_rule`` in the history's ``fuse`` step.
CUSTOM_METHOD = "custom"


def _rule_name(rule: Callable[..., Any]) -> str:
    """A callable's qualified name, as provenance records it: ``"mymodule.my_rule"``, ``"__main__.<lambda>"``,
    ``"numpy.maximum"`` (a ``functools.partial``: its function's). Never its code, never a pickle."""
    func = getattr(rule, "func", rule) if type(rule).__name__ == "partial" else rule
    module = getattr(func, "__module__", None) or type(func).__module__
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or type(func).__qualname__
    return f"{module}.{name}" if module and module != "builtins" else str(name)


def _check_method(method: Any) -> Any:
    """``method`` lower-cased, or a callable as it is; a typo is shown as written (with the near name), a path or
    an array only by its type."""
    if isinstance(method, str) and method.lower() in available_methods():
        return method.lower()
    if callable(method) and not isinstance(method, (str, type)):
        return method
    raise unknown_choice(method, "fusion method", available_methods(),
                         fix=f"use one of {', '.join(available_methods())}, or pass a function of your own: "
                             "method=my_rule, with def my_rule(a, b): ... (see help(medfuse.fuse))")


def _check_rule(rule: Callable[..., Any], n: int, options: Dict[str, Any]) -> None:
    """Refuse, before any work, a rule that cannot be called with ``n`` images and the options given.

    Why: Python's "takes 1 positional argument but 2 were given" came after the normalisation, from inside
    medfuse, without saying how the rule is called.
    """
    import inspect

    names = [k for k in options if k not in ("progress", "cancel")]
    try:
        signature = inspect.signature(rule)
    except (TypeError, ValueError):  # a callable without a signature (some built-ins): called as it is
        return
    try:
        signature.bind(*range(n), **{k: None for k in names})
    except TypeError as e:
        given = f"{n} images as positional arguments" + (f" and the options {', '.join(names)}" if names else "")
        raise InvalidInputError(f"the fusion rule {_rule_name(rule)} cannot be called with the {given} ({e})",
                                fix="define it as def my_rule(a, b): ... (def my_rule(*images) for 2 or 3 inputs), "
                                    "with an option of its own as a keyword argument: def my_rule(a, b, alpha=0.5)"
                                ) from None


def _call_rule(rule: Callable[..., Any], arrays01: Sequence[np.ndarray], options: Dict[str, Any]) -> np.ndarray:
    """``rule(*arrays01, **options)``, checked: one finite real array of the inputs' shape, as float64."""
    shape = arrays01[0].shape
    out = rule(*[np.asarray(a, dtype=np.float64) for a in arrays01], **options)
    name = _rule_name(rule)
    try:
        y = np.asarray(out.detach().cpu() if hasattr(out, "detach") else out)  # a torch tensor, as inputs are taken
    except (TypeError, ValueError, RuntimeError):
        y = np.asarray(None)
    if y.shape != shape or not (np.issubdtype(y.dtype, np.number) or y.dtype == bool) or np.iscomplexobj(y):
        got = describe(out) if y.shape == shape or not hasattr(out, "shape") else f"an array of shape {y.shape}"
        raise InvalidInputError(f"the fusion rule {name} returned {got}; it must return one real array of the "
                                f"inputs' shape {shape}",
                                fix="return an array like its inputs, e.g. numpy.maximum(a, b) or 0.5 * (a + b); a "
                                    "reduction needs the inputs stacked first: numpy.stack([a, b]).max(axis=0)")
    y = y.astype(np.float64)
    if not all_finite(y, 1 << 22):
        bad = int(np.count_nonzero(~np.isfinite(y)))
        raise InvalidInputError(f"the fusion rule {name} returned {bad} NaN or infinite value(s) (of {y.size})",
                                fix="guard its divisions and logarithms, e.g. numpy.divide(x, y, "
                                    "out=numpy.zeros_like(x), where=y != 0)")
    return y


def _refuse_bool_weights(method: str, options: Dict[str, Any], n: int) -> None:
    """Refuse bools as a weighted rule's ``weights`` (the network's ``weights`` is a file, not checked here).

    Why: NumPy reads True/False as 1/0, so ``weights=[True, False]`` dropped input 2 without a word; numeric
    options refuse bools everywhere else (docs/architecture.md).
    """
    from .classical import _OPTIONS

    w = options.get("weights")
    if not isinstance(method, str) or "weights" not in _OPTIONS.get(method, ()) or w is None:
        return
    items = w.ravel().tolist() if isinstance(w, np.ndarray) else list(w) if isinstance(w, (list, tuple)) else [w]
    if any(isinstance(v, (bool, np.bool_)) for v in items):
        raise InvalidInputError(f"weights must be {n} non-negative numbers, got bools (True/False)",
                                fix=f"pass numbers, e.g. weights={[round(1 / n, 3)] * n}, or "
                                    f"weights={[1.0] + [0.0] * (n - 1)} for input 1 alone")


def _within(x: np.ndarray, lo: float, hi: float) -> bool:
    return float(x.min()) >= lo and float(x.max()) <= hi


#: How far above 1 a Volume given ``normalise="none"`` may reach (an interpolation's overshoot, clipped).
_NONE_SLACK = 0.01

#: How far outside 0..1 a float volume may reach and still count as normalised upstream: float32 rounding (the
#: SPM12 PET template peaks at 1.0000000591, and was percentile-scaled instead: 11 % of voxels moved by > 0.02).
_ROUNDING = 1e-6

#: Keys a per-input normalisation dict may hold (the keyword arguments of ``normalise.normalise``).
_SPEC_KEYS = ("method", "modality", "unit", "level", "width", "suv_max", "dose_max", "percentiles", "low",
              "high")

#: Float inputs share a 0..1 or 0..255 scale only when their maxima are within this factor of each other.
_SHARED_SCALE_RATIO = 4.0

#: How far (a fraction of the scale) float inputs may reach below 0 or above their shared scale and still share
#: it, clipped: an interpolation's overshoot or rounding, as ``_NONE_SLACK``. One pixel at -1e-9 switched the pair
#: to per-image min/max (the network's output moved by up to 0.77, the max rule's by 0.49).
_SHARED_SLACK = _NONE_SLACK


def _check_normalise_name(name: str) -> None:
    """Refuse a normalisation method that names none, with the near name of a typo (``'minmx'``: ``'minmax'``).

    Why here: :func:`medfuse.fusion.normalise.normalise` said "the str given names none of them", without it.
    """
    from .normalise import _METHODS

    if name not in ("auto", *_METHODS):
        raise unknown_choice(name, "normalisation method", ("auto", *_METHODS))


def _specs(normalise: Any, n: int) -> Optional[List[Dict[str, Any]]]:
    """One option dict per input from a list/tuple ``normalise``; None when it is a single setting."""
    if not isinstance(normalise, (list, tuple)):
        if not isinstance(normalise, str):
            raise InvalidInputError(f"normalise must be a method name or a list of per-input dicts, got "
                                    f"{type(normalise).__name__}", fix="pass e.g. 'auto', 'minmax' or [{...}, {...}]")
        _check_normalise_name(normalise)
        return None
    if len(normalise) != n:
        raise InvalidInputError(f"normalise has {len(normalise)} entries for {n} inputs",
                                fix="give one dict of options (or one method name, or None) per input")
    out = []
    for i, spec in enumerate(normalise, start=1):
        if spec is None or isinstance(spec, str):
            spec = {} if spec is None else {"method": spec}
        if not isinstance(spec, dict):
            raise InvalidInputError(f"normalise entry {i} is a {type(spec).__name__}",
                                    fix="give a dict such as {'method': 'window', 'level': 40}, a method name or None")
        unknown = sorted(set(spec) - set(_SPEC_KEYS))
        if unknown:
            raise InvalidInputError(f"normalise entry {i} has unknown keys {unknown}",
                                    fix=f"use only {', '.join(_SPEC_KEYS)}")
        # Here, not only in normalise(): a Volume found normalised upstream never reaches it, typo and all.
        from .normalise import _check_labels

        try:
            _check_labels(spec.get("method", "auto"), spec.get("modality"), spec.get("unit"))
            _check_normalise_name(spec.get("method", "auto"))
        except InvalidInputError as e:
            raise InvalidInputError(f"normalise entry {i}: {e.problem}", fix=e.fix) from None
        out.append(dict(spec))
    return out


def _shared_scale(arrays: Sequence[np.ndarray]) -> Optional[Tuple[float, float]]:
    """The 0..1 or 0..255 scale the inputs already share, or None (then each is scaled by min/max).

    8-bit-style integer images share 0..255 by convention; bool masks are left out (True is full scale). Float
    images in one band share it only when they use it alike: an MR in 0..150 beside a PET in SUV 0..8 would
    otherwise leave the PET at about 3 % of the scale, too dim to count in the fusion. Float images alike in
    0..255 that fill less than a quarter of 0..1 or 0..255 share their joint range (0 to the larger maximum)
    instead. A negligible undershoot or overshoot (within ``_SHARED_SLACK`` of the scale) keeps it, clipped.
    """
    # A bool mask has no scale of its own (its True is the full scale of the others'), so it has no say either;
    # counted as an 8-bit image it put the others on 0..255 and its True at 1/255 of that (invisible).
    if any(a.dtype != bool for a in arrays):
        arrays = [a for a in arrays if a.dtype != bool]
    # An all-zero input fits any scale, so it has no say; a constant non-zero one does, by its level: a
    # uniform 200 beside a 0..1 image is not on "their" 0..255 scale (that left the image at 0.4 % of it).
    peaks = [float(a.max()) for a in arrays if float(a.max()) > 0.0]
    alike = not peaks or min(peaks) * _SHARED_SCALE_RATIO >= max(peaks)
    integer = all(np.issubdtype(a.dtype, np.integer) or a.dtype == bool for a in arrays)
    if integer:
        for top in (1.0, 255.0):
            if all(_within(a, 0.0, top) for a in arrays):
                return 0.0, top
        return None
    if not alike:
        return None
    # Float images that use one band alike share it. 0..1 and 0..255 when they fill at least a quarter of it
    # (the factor "alike" allows); else their joint range: two images in 0..3 were taken as 0..255 and reached
    # the network at 1 % of its scale (Qabf 0.66 -> 0.54), and so were images in 0..0.01 on 0..1.
    top = max(peaks, default=1.0)
    if top > 255.0 * (1.0 + _SHARED_SLACK):
        return None
    scale = next((s for s in (1.0, 255.0) if s / _SHARED_SCALE_RATIO <= top <= s * (1.0 + _SHARED_SLACK)), top)
    if min(float(a.min()) for a in arrays) < -_SHARED_SLACK * scale:
        return None
    return 0.0, scale


def _output_scale_index(arrays: Sequence[np.ndarray]) -> int:
    """Which input's scale the fused array is returned on: the first one that is not constant.

    A constant input has no intensity scale to return to (min/max maps it to ``[c, c + 1]``): a uniform
    5000 first would have put the fusion of a 0..1 image in 5000..5001.
    """
    varied = [i for i, a in enumerate(arrays) if float(a.max()) > float(a.min())]
    # A bool mask has no intensity scale to return to either: the first varied image that is not one, if any.
    return next((i for i in varied if arrays[i].dtype != bool), varied[0] if varied else 0)


def _normalise_arrays(arrays: Sequence[np.ndarray], normalise: Any, *,
                      originals: Optional[Sequence[np.ndarray]] = None) -> Tuple[List[np.ndarray], List[Dict[str, Any]]]:
    """Scale arrays to 0..1; the first record maps the result back to the output scale.

    ``originals`` (the inputs before the float64 cast) tell integer images from float ones.
    """
    from .normalise import normalise as norm

    specs = _specs(normalise, len(arrays))
    if specs is not None:
        pairs = [norm(a, **spec) for a, spec in zip(arrays, specs)]
    elif normalise != "auto":
        # One method for every input (e.g. "none", "percentile", "minmax").
        pairs = [norm(a, method=str(normalise)) for a in arrays]
    else:
        shared = _shared_scale(originals if originals is not None else arrays)
        full = [o.dtype == bool for o in (originals if originals is not None else arrays)]
        if shared == (0.0, 255.0):
            _warn_integer_masks(originals if originals is not None else arrays)
        if shared is not None:
            pairs = [norm(a, method="range", low=0.0 if m else shared[0], high=1.0 if m else shared[1])
                     for a, m in zip(arrays, full)]
        else:  # a bool mask is on 0..1 (min/max made an all-True mask 0)
            pairs = [norm(a, method="range", low=0.0, high=1.0) if m else norm(a, method="minmax")
                     for a, m in zip(arrays, full)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _warn_integer_masks(arrays: Sequence[np.ndarray]) -> None:
    """Warn of an integer 0/1 input (a mask stored as uint8, as MONAI stores labels) on the 0..255 scale the others
    share: it is 1/255 of that scale, and every rule all but ignored it (1 pixel changed, against 400 for the same
    mask as bool)."""
    import warnings

    from ..errors import MedfuseWarning

    for i, a in enumerate(arrays, start=1):
        if np.issubdtype(a.dtype, np.integer) and float(a.max()) == 1.0 and float(a.min()) >= 0.0:
            warnings.warn(f"input {i} holds only 0 and 1 (a mask?) beside images on 0..255, the 8-bit scale integer "
                          "images share: its 1 is 1/255 of that scale, almost invisible in the fusion. Pass it as "
                          "bool (True counts as the full scale), or scale it to 0..255 first", MedfuseWarning,
                          stacklevel=user_stacklevel())


def _refuse_none_off_scale(method: str, arrays: Sequence[np.ndarray], recs: Sequence[Dict[str, Any]]) -> None:
    """Refuse arrays given ``normalise="none"`` above 0..1 when the network runs (as :func:`_normalise_volumes`
    refuses such Volumes).

    Why: the network clips its inputs to 0..1, so an image in 0..255 came out almost all white (mean 0.9995)
    after a mere warning. The classical rules take arrays on their own scale with "none", so they are left alone.
    """
    if method != "network":
        return
    for i, (a, rec) in enumerate(zip(arrays, recs), start=1):
        if rec.get("method") == "none" and float(a.max()) > 1.0 + _NONE_SLACK:
            raise InvalidInputError(
                f"input {i} is not on the 0..1 scale that normalise='none' takes for the network (its values span "
                f"{float(a.min()):.4g}..{float(a.max()):.4g}; the network clips its inputs to 0..1, so the fusion "
                "would come out flat)",
                fix="leave normalise='auto' (a shared scale, else min/max), pass 'minmax' or 'percentile', scale the "
                    "image to 0..1 first, or use a classical rule (e.g. method='max'), which fuses arrays on their "
                    "own scale with 'none'")


def _normalise_volumes(vols: Sequence[Volume], normalise: Any, *,
                       dtype: Any = None) -> Tuple[List[np.ndarray], List[Dict[str, Any]]]:
    """The volumes scaled to 0..1, float64 (or ``dtype``: ``numpy.float32`` for the network, the same values
    rounded once, with no float64 copy of a volume), and their records.

    With ``dtype=numpy.float32``, a float32 volume already normalised upstream (unit "arbitrary", in 0..1, as the
    pipeline hands it over) is returned itself, not copied: scaling it by ``range`` 0..1 gives its own values.
    Such an array is read, never written to.
    """
    from .normalise import normalise as norm

    as32 = dtype is not None and np.dtype(dtype) == np.float32

    specs = _specs(normalise, len(vols)) or [{"method": str(normalise)} for _ in vols]
    out, recs = [], []
    for i, (v, spec) in enumerate(zip(vols, specs), start=1):
        if np.iscomplexobj(v.array):
            raise InvalidInputError(f"volume {i} is complex ({v.array.dtype})",
                                    fix="fuse its magnitude: v.with_array(numpy.abs(v.array))")
        a = np.asarray(v.array)  # normalise() makes the float64 copy; a second one here only cost memory
        require_finite(a, f"volume {i}", before="fusing")
        if spec.get("method") == "none" and float(a.max()) > 1.0 + _NONE_SLACK:
            # A fused Volume is on 0..1: raw values here would all be clipped to 1, a flat result. Values below 0
            # are let through (clipped to 0, and counted): a resampled CT still labelled HU is filled with -1024
            # outside its field of view, which is the right "nothing there" after clipping.
            raise InvalidInputError(
                f"volume {i} is not on the 0..1 scale that normalise='none' takes (its values span "
                f"{float(a.min()):.4g}..{float(a.max()):.4g}; a fused Volume is on 0..1, so they would be clipped)",
                fix="leave normalise='auto' (chosen by modality and unit), pass 'minmax' or 'percentile', or scale "
                    "the image to 0..1 first")
        if spec.get("method", "auto") == "auto" and v.unit == "arbitrary" and _within(a, -_ROUNDING, 1.0 + _ROUNDING) \
                and "normalisation" in v.provenance:
            # Already normalised by medfuse (the pipeline's step and medfuse.normalise record it and set unit
            # "arbitrary"); a physical unit (HU, SUV) keeps its own rule even when its values lie in 0..1. Values
            # in 0..1 alone are no such evidence: every NIfTI loads as "arbitrary". A peak rule (>= 0.25) let
            # the SPM12 T1 (0..0.74) skip its percentiles here, unlike in the pipeline (medfuse fuse on the same
            # files: up to 0.26 apart), and made the result jump when a peak crossed 0.25 or 1; before that, the
            # SPM12 PET scaled by 0.02 was kept at 0..0.02 and vanished from the fusion.
            named = {k: spec[k] for k in ("modality", "unit") if spec.get(k) is not None}
            if named:
                said = ", ".join(f"{k}={val!r}" for k, val in named.items())
                warnings.warn(f"volume {i} is already normalised by medfuse (its provenance records it), so the "
                              f"{said} in normalise entry {i} is not used: its values are fused as they are. To "
                              f"normalise it again by that rule, pass the volume as loaded, before normalising",
                              MedfuseWarning, stacklevel=user_stacklevel())
            spec = {"method": "range", "low": 0.0, "high": 1.0}
            if as32 and a.dtype == np.float32:
                # (x - 0) / 1 in float64, clipped (nothing to clip) and rounded back: a's own values. The record
                # depends on the values only through clipped_fraction (0 here): one voxel gives it.
                rec = norm(a[(slice(0, 1),) * a.ndim], dtype=np.float32,
                           **{"modality": v.modality, "unit": v.unit, **spec})[1]
                out.append(a)
                recs.append(rec)
                continue
        labels = {"modality": v.modality, "unit": v.unit}
        if "modality" in spec and "unit" not in spec and _modality_code(spec["modality"]) != v.modality:
            # A unit is stated for the volume's own modality: a spec that names another one (an MR volume
            # fused as CT) leaves the unit unknown, so 'auto' reads the named modality as such.
            labels["unit"] = None
        within = _in_own_view(v, a, {**labels, **spec}, dtype if as32 else None)
        y, rec = within if within is not None else norm(a, **{**labels, **spec},
                                                        **({"dtype": dtype} if as32 else {}))
        out.append(y)
        recs.append(rec)
    return out, recs


def _in_own_view(v: Volume, a: np.ndarray, options: Dict[str, Any], dtype: Any):
    """``(scaled, record)`` with the percentiles over the voxels of its own, for a volume :func:`medfuse.resample`
    made that does not cover its whole grid and whose rule takes percentiles; else None (the usual rule).

    Why: as the pipeline does since 2026-12-06. The napari widget and ``FuseModalitiesd(resample=True)``
    resample with :func:`medfuse.resample` and fuse here; their percentiles were taken over the whole grid,
    mostly fill, so the same pair fused brighter or darker than on the command line (a BraTS slab on 31 % of
    the grid: up to 0.083 apart on 0..1).
    """
    from .normalise import _in_own_view as within

    view = getattr(v, "_field_of_view", None)
    if view is None or set(options) - {"method", "modality", "unit", "percentiles"}:
        return None
    return within(a, view, method=options.get("method", "auto"), modality=options.get("modality"),
                  unit=options.get("unit"), percentiles=options.get("percentiles"), dtype=dtype)


def _modality_code(name: Any) -> str:
    """medfuse's code for a modality name ("PET" -> "PT"); the name itself, upper-cased, when it is no known one
    (the normalisation then refuses it with its own message)."""
    from ..errors import MedfuseError
    from ..volume import normalise_modality

    try:
        return normalise_modality(name)
    except MedfuseError:
        return str(name).upper()


def _as_network_precision(method: str, scaled: List[np.ndarray]) -> None:
    """Replace the 0..1 float64 inputs by float32 ones, in place, when the network runs.

    The network computes in float32 (:func:`medfuse.fusion.infer.fuse_arrays` casts to it), so the result is
    the same to the bit; holding the float64 copies through the fusion only cost memory (8 bytes a voxel
    and input: 0.8 GiB for a 512×512×200 pair).
    """
    if method == "network":
        for i, s in enumerate(scaled):
            scaled[i] = s.astype(np.float32)


def _as_array(x: Any, i: int) -> np.ndarray:
    """Input ``i`` (1-based) as a NumPy array; torch tensors are detached and copied to the CPU.

    Refused: a masked array with masked pixels (``np.asarray`` drops the mask, so they would be fused as image)
    and a MONAI ``MetaTensor`` (its affine would be dropped; as a Volume its geometry is kept).
    """
    if isinstance(x, np.ma.MaskedArray) and np.ma.getmaskarray(x).any():
        raise InvalidInputError(f"input {i} is a masked array; fusion takes no mask, so the masked pixels would be "
                                "fused as image", fix="fill them first (x.filled(0)), or pass np.ma.getdata(x)")
    if type(x).__module__.split(".")[0] in ("torch", "monai") and hasattr(x, "detach"):
        if hasattr(x, "affine") and hasattr(x, "meta"):
            raise InvalidInputError(f"input {i} is a MONAI MetaTensor; as a plain array its affine would be lost",
                                    fix="fuse Volumes, which keep the geometry: medfuse.Volume.from_metatensor(t) "
                                        "for each input (or pass t.array for the voxels alone)")
        t = x.detach().cpu()  # a tensor that needs grad, or on a GPU, has no NumPy view
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()  # NumPy has no bfloat16
        try:
            return t.numpy()
        except TypeError as e:  # float8 and other dtypes NumPy lacks: torch's "unsupported ScalarType" said no fix
            raise InvalidInputError(f"input {i} is a torch tensor of dtype {t.dtype}, which NumPy cannot hold",
                                    fix="convert it first: x.float() (float8 values are exact in float32)") from e
    # Why named here: as arrays these gave "got shape (6912,)" (an ITK image), "dtype object" (nibabel) or
    # "dtype <U38" (a path), which said nothing of the fix.
    if isinstance(x, (str, bytes, os.PathLike)):
        raise InvalidInputError(f"input {i} is a file path; fuse takes images",
                                fix="load the files first, medfuse.fuse(medfuse.load(a), medfuse.load(b)), or use "
                                    "medfuse.fuse_files(fixed, moving, out) for files")
    library = type(x).__module__.split(".")[0]
    if library in ("SimpleITK", "nibabel"):
        how = "Volume.from_sitk(image)" if library == "SimpleITK" else "Volume.from_nibabel(image)"
        raise InvalidInputError(f"input {i} is a {library} image, whose geometry a plain array would lose",
                                fix=f"convert each input with medfuse.{how}, which keeps it")
    try:
        a = np.asarray(x)
    except (ValueError, TypeError) as e:  # ragged nested lists: numpy's "inhomogeneous shape" named no input
        raise InvalidInputError(f"input {i} is not an array NumPy can read ({type(x).__name__}; a nested list "
                                "whose rows differ in length is not an image)",
                                fix="pass a NumPy array, or nested lists whose rows all have the same length") from e
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))  # big-endian in, native out (as Volumes do)
    return a


def _colour_like(x: np.ndarray, i: int, *, refuse: bool = True) -> bool:
    """Whether input ``i``, an ``(H, W, 3|4)`` array beside a 2-D image, is read as a colour image.

    Colour images are integer (uint8/uint16, as read from files) or float on 0..1. Negative values are not
    colour: the array is then taken as a few slices of a volume (and refused as a 2-D/3-D mix). A float array
    reaching above 1 is refused (``refuse``): as 3 slices of a PET in SUV it was fused as colour on 0..255 without
    a word (a (64, 64, 3) result, values up to 134 from inputs up to 1 and 8).
    """
    if x.dtype == bool or float(x.min()) < 0.0:
        return False
    if np.issubdtype(x.dtype, np.integer) or float(x.max()) <= 1.0:
        return True
    if refuse:
        raise InvalidInputError(
            f"input {i} (shape {x.shape}, {x.dtype}, values up to {float(x.max()):.4g}) beside a 2-D image is "
            "ambiguous: medfuse.fuse reads an (H, W, 3) array there as a colour image, but a float colour image "
            "is taken on 0..1 only, so these may be 3 slices of a volume",
            fix="for slices, fuse the 2-D image with one slice (volume[:, :, k]) or fuse volumes with volumes; "
                "for a colour image on 0..255, pass it as uint8 (numpy.round(x).astype(numpy.uint8)) or on 0..1 "
                "(x / 255)")
    return False


def _colour_peak(rgb: np.ndarray, name: str = "the colour image", *, or_peak: bool = False) -> float:
    """The value of full intensity in a colour image: 255 for 8-bit data, 65535 for uint16 above 255, else 1.

    Other integer dtypes above 255 are refused: their white is unknown (int32 0..1000 was read on 0..2**31, a
    result up to 1e9). ``or_peak``: the caller takes ``peak=``, which the fix then names.
    """
    top = float(rgb.max())
    also = "; or pass peak= (the intensity of white)" if or_peak else ""
    if np.issubdtype(rgb.dtype, np.integer):
        if rgb.dtype.kind == "i" and rgb.dtype.itemsize == 1:  # 0..255 does not fit, nor would the result
            raise InvalidInputError(f"{name} is int8, which holds only up to 127: too little for 8-bit colour "
                                    "(0..255) and for the fused result",
                                    fix="convert it to uint8 (x.astype(numpy.uint8)) or to floats on 0..1 (x / 127 "
                                        "when 127 is white)" + also)
        if top <= 255:
            return 255.0
        if rgb.dtype.kind == "u" and rgb.dtype.itemsize == 2:  # 16-bit colour's white (PNG, TIFF); any byte order
            return 65535.0
        raise InvalidInputError(f"{name} is {rgb.dtype.newbyteorder('=')} with values up to {top:.6g}: a colour "
                                "image is 8-bit (0..255), uint16 (0..65535) or float on 0..1, so its white is unknown",
                                fix="convert it: to uint8 or uint16 when white is 255 or 65535 "
                                    "(x.astype(numpy.uint16)), else to floats on 0..1 (x / white, e.g. x / 4095 "
                                    "for 12-bit data)" + also)
    if top > 255.0:
        raise InvalidInputError(f"the values of {name} reach {top:.4g}; a float colour image is read as 0..1 "
                                "or 0..255", fix="scale it to 0..1 (or pass it as uint8/uint16)" + also)
    return 255.0 if top > 1.0 else 1.0


def _fuse_rgb(arrays: List[np.ndarray], rgb_index: int, method: str, device: str, normalise: Any,
              options: Dict[str, Any]) -> np.ndarray:
    """A grey image with a pseudo-colour one: the luma is fused, the colour kept; RGB out on the colour's scale.

    The grey image is scaled on its own (``normalise`` applies to it), so a 0..1 MRI beside an 8-bit PET
    counts fully; the colour image keeps its own scale, which its colours are rebuilt on.
    """
    from .color import _fuse_luma, rgb_to_ycbcr

    if len(arrays) != 2:
        raise InvalidInputError("colour fusion takes one grey image and one RGB image", fix="fuse two images at a time")
    rgb, gray = arrays[rgb_index], arrays[1 - rgb_index]
    peak = _colour_peak(rgb, f"input {rgb_index + 1}, a colour image,")
    specs = _specs(normalise, 2)
    if specs is not None and specs[rgb_index]:
        raise InvalidInputError("a colour image's scale is set by its colours, not by normalise",
                                fix=f"give None for input {rgb_index + 1} and options only for the grey image")
    if specs is not None or normalise != "auto":
        mode = [specs[1 - rgb_index]] if specs is not None else normalise
        (gray01,), (rec,) = _normalise_arrays([gray.astype(np.float64)], mode)
        if rec.get("method") == "none" and float(gray.max()) > 1.0 + _NONE_SLACK:
            # "none" takes 0..1 (the documented case, kept as it is); a grey image above 1 cannot be on 0..1, so
            # it is taken on the colour image's scale. Read as 0..1 it was multiplied by the colour's peak and
            # clipped: an 8-bit MRI came out nearly white.
            gray01 = np.clip(gray.astype(np.float64) / peak, 0.0, 1.0)
    else:
        # The grey image shares the colour image's scale only when both use it alike (8-bit pairs).
        shared = _shared_scale([gray, rgb])
        gray01 = gray.astype(np.float64) if gray.dtype == bool else \
            _normalise_arrays([gray.astype(np.float64)], "minmax")[0][0] if shared is None else \
            np.clip(gray.astype(np.float64) / shared[1], 0.0, 1.0)  # a bool mask's True: full scale

    def _luma(pair):
        scaled = [np.clip(np.asarray(p, dtype=np.float64) / peak, 0.0, 1.0) for p in pair]
        if rgb_index == 0:  # back in the caller's order, which options such as weights= follow
            scaled.reverse()
        return _run(method, scaled, device=device, options=options) * peak

    # The grey image is on the colour's scale by construction here (fuse_rgb's scale checks are for its callers).
    out = _fuse_luma(np.clip(gray01, 0.0, 1.0) * peak, rgb, rgb_to_ycbcr(rgb, peak=peak), peak, method=method,
                     fuse_fn=_luma, options={})
    return out.astype(rgb.dtype, copy=False) if np.issubdtype(rgb.dtype, np.floating) else out


class _Required:
    """``fuse``'s default for ``b``, so that ``fuse(a)`` alone gets a typed error instead of Python's "missing 1
    required argument"; its repr is what help() and inspect.signature show (they showed ``b=<object object at
    0x...>``)."""

    def __repr__(self) -> str:
        return "<required>"


_MISSING: Any = _Required()

#: A fusion method: a name (``"network"``, a classical rule) or a rule of the caller's (see :func:`fuse`).
_Method = Union[str, Callable[..., Any]]


# For type checkers: Volumes in give a Volume, NumPy arrays an array; anything else (torch tensors, lists: an
# array at run time; a mix of Volumes and arrays: InvalidInputError) either. Not Any -> array: a Volume typed as
# Any would then be promised an array. ``b`` is required in each (fuse(a) alone is an error).
@overload
def fuse(a: Volume, b: Volume, *more: Volume, method: _Method = ..., device: str = ..., normalise: Any = ...,
         progress: Optional[ProgressFn] = ..., cancel: Optional[CancelToken] = ..., **options: Any) -> Volume: ...


@overload
def fuse(a: np.ndarray, b: np.ndarray, *more: np.ndarray, method: _Method = ..., device: str = ...,
         normalise: Any = ..., progress: Optional[ProgressFn] = ..., cancel: Optional[CancelToken] = ...,
         **options: Any) -> np.ndarray: ...


@overload
def fuse(a: Any, b: Any, *more: Any, method: _Method = ..., device: str = ..., normalise: Any = ...,
         progress: Optional[ProgressFn] = ..., cancel: Optional[CancelToken] = ...,
         **options: Any) -> Union[Volume, np.ndarray]: ...


def fuse(a: Any, b: Any = _MISSING, *more: Any, method: _Method = "network", device: str = "cpu",
         normalise: Any = "auto", progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
         **options: Any) -> Union[Volume, np.ndarray]:
    """Fuse two or three co-registered images or volumes.

    Args:
        a, b, *more: 2-D/3-D NumPy arrays (or torch tensors, detached and copied to the CPU) of one
            shape, or :class:`~medfuse.Volume`s on one grid. MONAI MetaTensors are refused (as arrays
            their affine would be lost): pass ``Volume.from_metatensor(t)``. One 2-D input may be an
            ``(H, W, 3)`` RGB image (pseudo-colour PET/SPECT) beside one grey image: its luma is fused
            through YCbCr and the result is RGB on its scale (0..1, 0..255 or 16-bit; ``normalise`` then
            applies to the grey image only). Such an array is colour when it is integer (uint8/uint16) or float
            on 0..1 (its white: 255 for integers up to 255, 65535 for uint16 above; int8, and other integer
            dtypes above 255, are refused: their white is unknown); float values above 1 are refused as
            ambiguous (3 slices of a volume?), and negative ones
            make it slices (refused beside a 2-D image). A bool input (a mask) counts True as the full scale
            of the other inputs' shared range.
        method: ``"network"``, a classical rule (:data:`CLASSICAL_METHODS`), or a rule of your own: a function
            called as ``method(a01, b01[, c01], **options)``. It receives the inputs after normalisation
            (``normalise``), as float64 arrays of one shape on 0..1 (2-D images, 3-D volumes; for an RGB
            input, the luma; with ``normalise="none"``, arrays on their own scale), in the order given, and
            must return one real, finite array of that shape on the same scale: the fusion, which ``fuse``
            maps back as for a built-in rule (Volumes: clipped to 0..1). ``**options`` are passed to it as
            keyword arguments. A result of another shape, or holding NaN or infinity, is an
            ``InvalidInputError``; an error the rule raises passes through. Provenance records
            ``method: "custom"`` and, in the ``fuse`` history step, the function's qualified name
            (``custom_rule``: ``"__main__.my_rule"``), never its code.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"auto"`` or a ``torch.device``
            (used by the network only, but checked for every method before any work:
            :func:`medfuse.fusion.device.resolve_device`).
        normalise: ``"auto"``, ``"none"``, a :mod:`~medfuse.fusion.normalise` method name for every
            input, or a list of option dicts (one per input, e.g. ``{"method": "window", "level": 40}``).
            ``auto`` for arrays keeps a shared 0..1 or 0..255 scale when the inputs use it alike
            (integer images always; float images when their maxima are within a factor of 4, a
            constant input counting by its level and an all-zero one not at all; values within 1 % of the
            scale outside it are clipped into it), else
            scales each by min/max, so that an MR in 0..150 beside a PET in SUV 0..8 both count;
            for Volumes it picks by modality and unit (CT in HU: window; PET in SUV: SUV range; an RT dose
            in Gy: 0 Gy to its largest dose, or to ``dose_max`` in its dict; MR, CT not in HU and the rest:
            percentiles; the record's ``auto`` says why) and leaves
            volumes already normalised by medfuse (the pipeline's step, ``medfuse.normalise``: a
            ``normalisation`` record, unit "arbitrary", values in 0..1) as they are. A Volume that
            :func:`medfuse.resample` made onto a grid it covers only in part takes its percentiles over its own
            field of view there, as the pipeline does (the record's ``over`` says so). ``"none"``
            takes inputs on 0..1 (arrays keep their own scale with a classical rule).
        progress, cancel: see :mod:`medfuse.progress` (the network reports per slab; a classical
            rule at its start and end).
        **options: passed to the rule (see :func:`medfuse.fusion.classical.fuse_arrays`) or to
            :func:`medfuse.fusion.infer.fuse_arrays`. For the network on Volumes, ``functional`` (whether
            an input shows uptake, or bright structures that must stay bright) defaults to their
            modalities: True with a PT, NM or CT input (uptake; CT bone) or an RT dose (unit Gy), whatever the
            others are; False when every input is MR; None otherwise (an ``unknown`` input beside MR). In 3-D,
            True and None both keep the coarse pixel rule; True (with the shipped weights) makes it "the
            brighter input at that scale wins", None the stronger detail. Arrays carry no modality: pass
            ``functional=True`` with a PET/SPECT array so that a hot spot over a dark MR core stays visible (without it, 2-D images get
            the learned choice, which can hide one).

    Returns:
        Arrays in: an array on the first input's intensity scale (inputs 0..1 give 0..1; the first input
            that is not constant and not a bool mask, when the first is), of the inputs'
        floating dtype (float32 inputs give float32), float64 for integer or boolean inputs. With an RGB
        input: RGB on that image's scale and of its dtype (``uint8`` stays ``uint8``).
        Volumes in: a float32 Volume in 0..1 on the first input's grid, modality ``unknown``, unit
        ``arbitrary``, provenance with ``method``, ``normalisation`` and (network) ``weights_sha256``,
        ``network_functional``, ``network_path`` and ``network_threads``. The network fuses Volumes (and 3-D arrays) thinner than
        8 voxels along one axis (a single slice, or a few thick slices) slice by slice with the 2-D path
        (``network_path`` says so); thin along two axes is an error (a classical rule handles it). A 3-D
        array whose first or last axis is 3 or 4 long may be colour (HWC, CHW), and is refused.

    Raises:
        InvalidInputError: wrong count, shapes, NaN, complex values, masked pixels, a MetaTensor, Volumes mixed
            with arrays, unknown method (a typo's message names the near one), normalisation, option or device, a
            rule of your own that cannot take the inputs and options or returns another shape or NaN, a GPU this
            machine lacks, ``progress`` not callable or ``cancel`` not a CancelToken, a float ``(H, W, 3)`` array
            above 1 beside a 2-D image (colour or slices?), an int8 colour image or one of another integer dtype
            than uint16 above 255 (its white is unknown), a ragged nested list, a torch dtype NumPy lacks (float8),
            a network ``batch_size`` that is not a whole number >= 1 (for 2-D images too), an unknown
            ``modality``/``unit`` in a ``normalise`` dict, ``normalise="none"`` with values above 1 for Volumes or
            for the network, bool ``weights`` for a weighted rule.
        GeometryError: Volumes on different grids.
        MissingDependencyError: the network cannot run here (torch or medfuse.fusion.infer missing);
            errors raised by the network itself (WeightsError, FusionError) pass through.

    Examples:
        Two 2-D images on 0..1 (an MR and a PET slice, say), fused with a classical rule:

        >>> import numpy as np
        >>> import medfuse
        >>> mr = np.array([[0.0, 0.2], [0.8, 1.0]]).repeat(8, 0).repeat(8, 1)   # 16x16, on 0..1
        >>> pet = np.eye(16)                                                      # a bright diagonal
        >>> fused = medfuse.fuse(mr, pet, method="max")
        >>> fused.shape, float(fused.max()), float(fused[0, 0])
        ((16, 16), 1.0, 1.0)

        A rule of your own (it gets the normalised inputs, float64 on 0..1, and returns their fusion):

        >>> def brighter_mean(a, b, weight=0.75):
        ...     return weight * np.maximum(a, b) + (1 - weight) * np.minimum(a, b)
        >>> custom = medfuse.fuse(mr, pet, method=brighter_mean, weight=0.5)
        >>> bool(np.allclose(custom, (mr + pet) / 2))
        True

        Volumes on one grid give a Volume: ``medfuse.fuse(ct_vol, pet_vol, method="laplacian")`` (see
        docs/fusion.md; show its slices with :func:`medfuse.display.orthogonal_slices`).
    """
    check_callbacks(progress, cancel)
    if progress is not None:
        options["progress"] = progress
    if cancel is not None:
        options["cancel"] = cancel
    if b is _MISSING:
        listed = isinstance(a, (list, tuple)) and 2 <= len(a) <= 3
        raise InvalidInputError("fusion takes two or three images, got " + (
            f"one {type(a).__name__} of {len(a)}" if isinstance(a, (list, tuple)) else "one"),
            fix="unpack the list: fuse(*images)" if listed else "pass them as separate arguments: fuse(a, b)")
    inputs = [a, b, *more]
    for i, x in enumerate(inputs):
        if isinstance(x, str) and x.lower() in available_methods():  # fuse(a, b, "mean"): read as a third image
            raise InvalidInputError(f"input {i + 1} is the method name {x!r}, not an image",
                                    fix=f"name it: fuse(a, b, method={x.lower()!r}) (method is keyword-only)")
    if len(inputs) > 3:
        raise InvalidInputError(f"fusion takes two or three inputs, got {len(inputs)}", fix="fuse at most three images")
    method = _check_method(method)
    if callable(method):
        _check_rule(method, len(inputs), options)
    # Before any work, and for every method: a misspelt device is refused even where a rule ignores it.
    from .device import check_device_name, check_network_device

    check_device_name(device)
    check_network_device(method, device)
    _refuse_bool_weights(method, options, len(inputs))
    if method == "network" and "batch_size" in options:
        # Checked for every input before any work: infer checks it on the 3-D path only, so batch_size=-3 with
        # 2-D images (or volumes fused slice by slice) was ignored without a word.
        from .._checks import whole

        whole(options["batch_size"], "batch_size", minimum=1, what="a whole number of slices",
              example="batch_size=32 (smaller uses less memory; 2-D images do not use it)")
    n_vol = sum(isinstance(x, Volume) for x in inputs)
    if n_vol not in (0, len(inputs)):
        raise InvalidInputError(
            "inputs mix Volumes and plain arrays", fix="pass all Volumes (geometry is checked) or all arrays"
        )
    if n_vol:
        return _fuse_volumes(inputs, method=method, device=device, normalise=normalise, options=options)

    arrays = []
    for i, x in enumerate(inputs):
        arr = _as_array(x, i + 1)
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise InvalidInputError(f"input {i + 1} must be numeric, got dtype {arr.dtype}", fix="pass numeric arrays")
        if np.iscomplexobj(arr):
            raise InvalidInputError(f"input {i + 1} is complex ({arr.dtype})",
                                    fix="pass its magnitude (np.abs) or its real part")
        if arr.size == 0:
            raise InvalidInputError(f"input {i + 1} is empty (shape {arr.shape})", fix="pass an image with pixels in it")
        require_finite(arr, f"input {i + 1}", before="fusing")
        arrays.append(arr)
    shapes = [x.shape for x in arrays]
    beside = [i for i, s in enumerate(shapes) if len(s) == 3 and s[2] in (3, 4)
              and any(t == s[:2] for t in shapes if len(t) == 2)]  # (H, W, 3|4) beside an (H, W) image
    rgb = [i for i in beside if shapes[i][2] == 3 and _colour_like(arrays[i], i + 1)]
    if rgb:
        return _fuse_rgb(arrays, rgb[0], method, device, normalise, options)
    rgba = [i for i in beside if shapes[i][2] == 4 and _colour_like(arrays[i], i + 1, refuse=False)]
    if rgba:
        raise InvalidInputError(f"input {rgba[0] + 1} has 4 channels (RGBA); colour fusion takes RGB",
                                fix="drop the alpha channel first: image[..., :3]")
    if len({len(s) for s in shapes}) != 1:
        # Not a grid mismatch that resampling mends: a slice and a volume (or a 4-D series).
        k = next((i for i in beside if shapes[i][2] == 3), None)  # (H, W, 3) not read as colour: bool or negative
        also = "" if k is None else (
            f"; if input {k + 1} is a colour image, pass it as uint8 on 0..255 or as floats on 0..1 (a "
            f"{'bool' if arrays[k].dtype == bool else 'negative-valued'} array is not read as colour)")
        raise InvalidInputError(f"the inputs mix {' and '.join(f'{len(s)}-D' for s in shapes)} arrays (shapes {shapes})",
                                fix="fuse like with like: a 2-D image with one slice of the volume (e.g. volume[:, :, k]), "
                                    "or volumes on one grid" + also)
    if len(set(shapes)) != 1:
        raise InvalidInputError(
            f"the inputs have different shapes {shapes}",
            fix="resample them onto one grid first: plain arrays carry no geometry, so wrap each as a "
                "medfuse.Volume(array, affine) and use medfuse.register / medfuse.resample on those",
        )
    if arrays[0].ndim not in (2, 3):
        raise InvalidInputError(f"expected 2-D images or 3-D volumes, got shape {shapes[0]}", fix="pass 2-D or 3-D arrays")
    single = [k for k, n in enumerate(shapes[0]) if n == 1] if arrays[0].ndim == 3 else []
    if len(single) == 1 and min(n for n in shapes[0] if n != 1) >= 2:
        # One slice of a volume, (H, W, 1): fused as the 2-D image it is and given back in its own shape, as a
        # one-slice Volume is (it was refused: "every side needs at least 2 pixels").
        flat = [np.squeeze(x, axis=single[0]) for x in arrays]
        return np.expand_dims(fuse(*flat, method=method, device=device, normalise=normalise, **options), single[0])
    if arrays[0].ndim == 3 and shapes[0][2] in (3, 4) and min(shapes[0][:2]) >= 16 and method != "network":
        # Two colour images look like two 3-slice volumes: the rules would filter across R, G and B.
        warnings.warn(f"the inputs (shape {shapes[0]}) are fused as {shapes[0][2]}-slice volumes; if they are colour "
                      "images, convert them to grey first (medfuse.fusion.color.rgb_to_gray), or fuse a grey image "
                      "with one colour image", MedfuseWarning, stacklevel=2)
    _warn_constant(arrays, "input")
    # normalise() makes its own float64 copy of each input: no second one here (peak memory on volumes).
    scaled, recs = _normalise_arrays(arrays, normalise, originals=arrays)
    _refuse_none_off_scale(method, arrays, recs)
    _as_network_precision(method, scaled)
    thin = _thin_axis(method, shapes[0])
    if thin is not None:
        fused01 = _slice_by_slice(method, scaled, thin, device=device, options=options)
    else:
        fused01 = _run(method, scaled, device=device, options=options)
    del scaled  # not needed any more: its memory goes back before the output is rescaled
    from .normalise import denormalise

    # Float inputs get their own precision back (a float32 volume stays float32, at half the memory).
    common = np.result_type(*arrays)
    return denormalise(fused01, recs[_output_scale_index(arrays)]).astype(common if np.issubdtype(common, np.floating) else np.float64,
                                                 copy=False)


def _reoriented_copy(v: Volume, ref: Volume) -> bool:
    """Is ``v`` on ``ref``'s grid but for the order and direction of its voxel axes?"""
    if v.orientation == ref.orientation or sorted(v.shape) != sorted(ref.shape):
        return False
    try:
        return ref.same_grid(v.reorient(ref.orientation))
    except MedfuseError:  # an oblique grid with no exact reorientation
        return False


def _thin_axis(method: str, shape: Tuple[int, ...]) -> Optional[int]:
    """The axis a 3-D array too thin for the network's tri-plane path along exactly that one is fused along, slice
    by slice with the 2-D path, as a Volume is; None otherwise. A first or last axis of 3 or 4 may be colour
    (HWC, or CHW as torch and PIL tensors lay it out): refused, as before, rather than fused channel by channel."""
    if method != "network" or len(shape) != 3:
        return None
    thin = [ax for ax, n in enumerate(shape) if n < _MIN_SIZE_3D]
    if len(thin) != 1 or (thin[0] in (0, 2) and shape[thin[0]] in (3, 4)) or min(shape) < 2:
        return None
    return thin[0]


#: Spacing ratio (largest / smallest) above which the network's voxel-based tri-plane path is warned about.
_ANISOTROPY_WARN = 3.0

#: How that warning begins: a caller that expects the anisotropy (the demo on its own 1 x 1 x 4 mm sample CT)
#: can filter it by this text (warnings.filterwarnings("ignore", message=_ANISOTROPY_NOTE)); provenance keeps it.
_ANISOTROPY_NOTE = "the voxels are anisotropic"


def _anisotropy_notes(ref: Volume, method: str, axis: Optional[int]) -> List[str]:
    """A warning (also returned, for provenance) when the network's 3-D path runs on strongly anisotropic voxels.

    Why only a warning: the tri-plane blurs, pools and merges in voxels, so on 0.5 x 0.5 x 5 mm data its coarsest
    detail level spans 10x more millimetres through-plane than in-plane (measured on BraTS keeping every 5th
    axial slice: 0.115 mean difference from the isotropic fusion inside the head). Changing that would change
    the output; resampling first is the user's call (memory grows with the finer grid).
    """
    if method != "network":
        return []
    # Slice by slice (a thin volume), only the slices' own two axes are mixed: their pixels may be as uneven.
    sp = np.asarray([s for ax, s in enumerate(ref.spacing) if ax != axis], dtype=float)
    ratio = float(sp.max() / sp.min())
    if ratio < _ANISOTROPY_WARN:
        return []
    if axis is not None:
        msg = (f"{_ANISOTROPY_NOTE} within the slices fused one at a time ({' x '.join(f'{s:g}' for s in sp)} mm "
               f"pixels, ratio {ratio:.1f}): the fusion network works in pixels, so along the coarse axis it mixes "
               f"detail over {ratio:.1f}x more millimetres; resample the volumes to near-square pixels first "
               "(medfuse.resample_to_common_grid([a, b]) puts them on an isotropic grid at their finest "
               "spacing), or use a classical rule")
    else:
        msg = (f"{_ANISOTROPY_NOTE} ({' x '.join(f'{s:g}' for s in sp)} mm, ratio {ratio:.1f}): the fusion "
               f"network works in voxels, so along the coarse axis it mixes detail over {ratio:.1f}x more "
               "millimetres than in-plane; for through-plane-consistent fusion resample the volumes to "
               "near-isotropic spacing first (medfuse.resample_to_common_grid([a, b]) puts them on an isotropic "
               "grid at their finest spacing), or use a classical rule")
    warnings.warn(msg, MedfuseWarning, stacklevel=4)
    return [msg]


def _warn_label_maps(vols: Sequence[Volume]) -> List[str]:
    """Warn of (and return, for provenance) each volume that looks like a label map or mask.

    Why: a segmentation given where an image belongs (the mask beside its MR in a classifier's folder) was fused
    without a word, its labels painted into the image; only its resampling was warned of.
    """
    from ..registration.resample import label_map_description, piecewise_constant

    notes = []
    for i, v in enumerate(vols, start=1):
        if 1 in v.shape:  # a one-slice Volume is a 2-D image (posterised pictures have few grey levels too)
            continue
        looks = "bool" if v.array.dtype == bool else label_map_description(v)
        if looks is None or (v.array.dtype != bool and not piecewise_constant(v.array)):
            continue
        msg = (f"volume {i} looks like a label map or mask ({looks}), not an image: the fusion paints its labels "
               "into the other inputs. Check that the intended image was given (a mask is shown over an image, "
               "e.g. as a napari Labels layer, rather than fused with it)")
        warnings.warn(msg, MedfuseWarning, stacklevel=user_stacklevel())
        notes.append(msg)
    return notes


def _warn_constant(arrays: Sequence[np.ndarray], what: str, *,
                   units: Optional[Sequence[str]] = None, zero: bool = False) -> List[str]:
    """Warn of (and return, for provenance) each input that holds one value other than 0 everywhere, and with
    ``zero`` (volumes) one that is 0 everywhere.

    Why: such an input is no image (a failed export, a wrong series), yet every rule fuses it without a word: the
    mean rule as a flat level over the others, max as a floor. An all-0 2-D image is the documented "no signal"
    case (the others alone: a dataset's edge slices) and is left as it is; an all-0 volume is a placeholder for a
    missing image (BraTS-style pipelines fill one with zeros), which fused silently into the other at half scale.
    """
    from .._checks import constant_value

    notes = []
    for i, a in enumerate(arrays, start=1):
        value = constant_value(np.asarray(a))
        if value is None or (value == 0 and not zero):
            continue
        unit = f" {units[i - 1]}" if units and units[i - 1] not in (None, "arbitrary") else ""
        element = "pixel" if np.ndim(a) == 2 else "voxel"
        if value == 0:
            msg = (f"{what} {i} is constant (every {element} is 0{unit}): it holds no image, and the fusion shows the "
                   "other inputs alone (the mean rule at a fraction of their contrast). Check that it is not an "
                   "empty placeholder for a missing image")
        else:
            msg = (f"{what} {i} is constant (every {element} is {value:g}{unit}): it holds no image, and the fusion "
                   "takes it as a flat level beside the other inputs. Check that the intended image was given")
        warnings.warn(msg, MedfuseWarning, stacklevel=user_stacklevel())
        notes.append(msg)
    return notes


def _different_patients_notes(vols: List[Volume]) -> List[str]:
    """The different-patients warning, unless resampling the inputs onto one grid already gave it."""
    from .._patient import different_patients_note

    for v in vols[1:]:
        note = different_patients_note(vols[0].provenance, v.provenance)
        if note is not None:
            if not any(note in w for u in vols for w in u.provenance.get("warnings", [])):
                warnings.warn(note, MedfuseWarning, stacklevel=4)
                return [note]
            return []
    return []


def _fuse_volumes(vols: List[Volume], *, method: str, device: str, normalise: Any, options: Dict[str, Any]) -> Volume:
    ref = vols[0]
    for i, v in enumerate(vols[1:], start=2):
        if not ref.same_grid(v):
            fix = ("register and resample it onto volume 1's grid first: medfuse.register(fixed, moving).resampled "
                   "or medfuse.resample(moving, fixed)")
            if _reoriented_copy(v, ref):
                # Exact, no interpolation: the resampling advice cost a blur for a pure flip or permutation.
                fix = (f"it is volume 1's grid with its voxel axes in another order: put them in volume 1's order, "
                       f"exactly (no interpolation): moving.reorient('{ref.orientation}')")
            raise GeometryError(f"volume {i} is on a different grid than volume 1: {ref.grid_difference(v)}", fix=fix)
    if method == "network" and "functional" not in options:
        # Why: the 3-D path's "brighter wins" choice keeps PET/SPECT uptake and CT bone visible, which the
        # learned choice trades for the MR's edges (it left 58 % of the phantom's skull dark beside an MR:
        # docs/network.md, "Thirty-first round"); it costs quality on MR-only pairs ("Ninth round").
        # A PET beside a T1 of unknown modality (a plain NIfTI) is still a PET: "unknown" won, and the hot-spot
        # rule was weakened to the stronger-detail one (up to 0.375 on an SPM12 T1 + PET), without a word.
        # An RT dose (unit Gy, modality "unknown") is an overlay like uptake: its hot spot must stay bright.
        from .normalise import FUNCTIONAL_UNITS

        modalities = {v.modality for v in vols}
        dose = any(v.unit in FUNCTIONAL_UNITS for v in vols)
        options = {**options, "functional": True if dose or modalities & {"PT", "NM", "CT"} else
                   None if "unknown" in modalities else False}
    # A single slice (2-D files load as (X, Y, 1)) takes the 2-D path; so, for the network, does each slice
    # of a volume too thin along one axis for the tri-plane path (a few thick CT or SPECT slices).
    flat = [ax for ax, n in enumerate(ref.shape) if n == 1]
    thin = [ax for ax, n in enumerate(ref.shape) if n < _MIN_SIZE_3D] if method == "network" else flat
    axis = flat[0] if len(flat) == 1 else thin[0] if len(thin) == 1 else None
    if axis is None and method == "network" and thin:
        raise InvalidInputError(f"the volumes (shape {ref.shape}) are too thin along {len(thin)} axes for the "
                                f"fusion network, which needs {_MIN_SIZE_3D} voxels along all axes but one",
                                fix="use a classical method (e.g. method='laplacian') for such small volumes")
    notes = _anisotropy_notes(ref, method, axis)
    notes += _different_patients_notes(vols)
    # All-0 warned of for volumes proper; a one-slice Volume (a 2-D file) is an image, quiet as 2-D arrays are.
    notes += _warn_constant([v.array for v in vols], "volume", units=[v.unit for v in vols],
                            zero=1 not in ref.shape)
    notes += _warn_label_maps(vols)
    # The network computes in float32: its inputs are normalised straight into float32 (the values a float64
    # normalisation cast to float32 gives; no float64 copy of a volume), and those already in 0..1 as float32
    # are not copied at all.
    scaled, recs = _normalise_volumes(vols, normalise, dtype=np.float32 if method == "network" else None)
    if axis is not None:
        fused = np.clip(_slice_by_slice(method, scaled, axis, device=device, options=options), 0.0, 1.0)
    elif method == "network":
        # Kept in float32 and clipped in place: float64, a clipped copy and a cast back gave the same values.
        fused = _run(method, scaled, device=device, options=options, network_float32=True)
        fused = np.clip(fused, 0.0, 1.0, out=fused)
    else:
        fused = np.clip(_run(method, scaled, device=device, options=options), 0.0, 1.0)
    del scaled
    custom = None if isinstance(method, str) else _rule_name(method)
    prov: Dict[str, Any] = {"method": method if custom is None else CUSTOM_METHOD, "normalisation": recs}
    # What was said about the inputs (repairs at loading, a resampling across frames of reference) stays with
    # the result, so that its sidecar tells the reader who signs off.
    inherited = [f"input {i}: {w}" for i, v in enumerate(vols, start=1) for w in v.provenance.get("warnings", [])]
    if inherited or notes:
        prov["warnings"] = [*inherited, *notes]
    # The files the inputs came from: medfuse.save never writes over them, even with overwrite=True.
    sources = [s for v in vols for s in [v.provenance.get("source"), *v.provenance.get("sources", [])]
               if isinstance(s, str)]
    if sources:
        prov["sources"] = list(dict.fromkeys(sources))
    if "nifti_space" in ref.provenance:  # the fused image lies on ref's grid, in ref's (e.g. MNI) space
        prov["nifti_space"] = ref.provenance["nifti_space"]
    if method == "network":
        prov["weights_sha256"] = _weights_hash(options.get("weights"))
        prov["network_functional"] = options.get("functional")
        # The 2-D path on a thin volume gives another result than the tri-plane one would (up to 0.9 on BraTS
        # slabs): the sidecar must say which ran.
        prov["network_path"] = "tri-plane 3-D" if axis is None else f"2-D, slice by slice along axis {axis}"
        # On the CPU the last bits (up to 2.4e-7 on the samples) depend on torch's thread count: a rerun to
        # check a result bit for bit needs the same (torch.set_num_threads, or OMP_NUM_THREADS on the CLI).
        prov["network_threads"] = _torch_threads()
    # No copy of a float32 result that is one block already (the network's, unless its padding was cut off).
    out = Volume(np.ascontiguousarray(fused, dtype=np.float32), ref.affine.copy(), modality="unknown", unit="arbitrary",
                 provenance=prov)
    # Each input's own history too (its registration and resampling): the fused Volume's record began at "fuse".
    # A rule of the caller's by its name only (the history's "custom_rule"): its code is theirs, and a pickle of it
    # would run code on loading.
    out.add_history("fuse", method=prov["method"], **({} if custom is None else {"custom_rule": custom}),
                    n_inputs=len(vols),
                    options={k: _jsonable(v) for k, v in options.items() if k not in ("progress", "cancel")},
                    input_histories=[list(v.provenance.get("history", [])) for v in vols])
    return out


def _torch_threads() -> Optional[int]:
    """torch's intra-op thread count (None where torch cannot say)."""
    try:
        import torch

        return int(torch.get_num_threads())
    except Exception:  # noqa: BLE001 - a record, never a reason to lose a result
        return None


#: The tri-plane path's smallest extent along an axis (:data:`medfuse.fusion.infer.MIN_SIZE_3D`; kept here so
#: that this module does not import torch).
_MIN_SIZE_3D = 8


def _slice_by_slice(method: str, scaled: Sequence[np.ndarray], axis: int, *, device: str,
                    options: Dict[str, Any]) -> np.ndarray:
    """Fuse the 2-D slices of ``scaled`` along ``axis`` one at a time; progress and cancel per slice."""
    progress, cancel = options.get("progress"), options.get("cancel")
    inner = {k: v for k, v in options.items() if k not in ("progress", "cancel")}
    n = scaled[0].shape[axis]
    out = []
    for i in range(n):
        check(cancel, "fusion")
        out.append(_run(method, [np.take(x, i, axis=axis) for x in scaled], device=device, options=inner))
        report(progress, (i + 1) / n, f"fused slice {i + 1} of {n}")
    return np.stack(out, axis=axis)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, np.generic):  # np.int64(3) is recorded as 3, not "3"
        return _jsonable(v.item())
    if isinstance(v, np.ndarray) and v.ndim <= 1 and v.size <= 64:
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)
