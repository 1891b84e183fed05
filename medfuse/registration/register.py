"""Rigid, affine and deformable multimodal registration with SimpleITK.

Pipeline: validate inputs -> working images (smoothed, resampled to the finest pyramid spacing) ->
initialise (geometry centre, moments, coarse multi-start over rotations) -> multi-resolution
optimisation (Mattes MI or correlation, sparse random sampling with a fixed seed) -> optional B-spline
stage -> honest report (metric before/after, iterations, stop reason, suspect reasons).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import CancelledError, InvalidInputError, RegistrationError
from ..progress import CancelToken, ProgressFn, report
from ..volume import Volume
from .presets import get_preset
from .resample import resample
from .transforms import Transform

__all__ = ["register", "RegistrationResult", "RegistrationReport"]

_KINDS = ("rigid", "affine", "deformable")
_METRICS = ("mattes", "correlation")
_INITS = ("auto", "geometry", "moments", "none")


@dataclass
class RegistrationReport:
    """What happened, for the reader who signs off. Metric values: lower is better (SimpleITK sign)."""

    kind: str
    metric: str
    preset: str
    metric_before: Optional[float]
    metric_after: Optional[float]
    iterations_per_level: List[int]
    stop_reason: str
    seconds: float
    converged: bool
    suspect: bool
    suspect_reasons: List[str] = field(default_factory=list)
    initialisation: str = ""
    rotation_deg: Optional[float] = None
    translation_mm: Optional[float] = None
    scale: Optional[List[float]] = None
    jacobian_min: Optional[float] = None
    jacobian_fraction_nonpositive: Optional[float] = None
    overlap_fraction: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, (np.floating, np.integer)):
                d[k] = v.item()
        return d


@dataclass
class RegistrationResult:
    """``transform`` (fixed point -> moving point), ``resampled`` (moving on the fixed grid), ``report``."""

    transform: Transform
    resampled: Volume
    report: RegistrationReport
    #: the rigid/affine part alone (for ``kind="deformable"``, the stage before the B-spline).
    linear_transform: Optional[Transform] = None


# --------------------------------------------------------------------------- validation
def _as_volume(v: Any, name: str) -> Volume:
    if isinstance(v, Volume):
        vol = v
    else:
        arr = np.asarray(v) if isinstance(v, (np.ndarray, list, tuple)) else None
        if arr is not None and arr.ndim == 2:
            raise InvalidInputError(f"{name} is a 2-D array {arr.shape}; registration is 3-D",
                                    fix="register 3-D volumes; for a single slice use a 2-D tool")
        raise InvalidInputError(f"{name} must be a medfuse Volume (it carries the geometry), got {type(v).__name__}",
                                fix="load it with medfuse.load, or wrap it: medfuse.Volume(array, affine_lps)")
    if min(vol.shape) < 4:
        raise InvalidInputError(
            f"{name} is effectively 2-D (shape {vol.shape}); 3-D registration needs at least 4 voxels along every axis",
            fix="register 3-D volumes; a single slice cannot be registered in 3-D")
    arr = vol.array
    if not np.all(np.isfinite(arr)) if np.issubdtype(arr.dtype, np.floating) else False:
        raise InvalidInputError(f"{name} contains NaN or infinite voxels",
                                fix="replace them (e.g. numpy.nan_to_num) before registering")
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if hi - lo <= 0:
        raise RegistrationError(f"{name} is constant (every voxel is {lo:g}); there is nothing to align",
                                fix="check that the right image was loaded (an empty or blank series?)")
    return vol


def _as_mask(mask: Any, vol: Volume, name: str):
    if mask is None:
        return None
    if isinstance(mask, Volume):
        if not mask.same_grid(vol):
            raise InvalidInputError(f"{name} is not on its image's grid",
                                    fix="resample the mask onto the image with medfuse.resample(mask, image, interpolation='nearest')")
        arr = mask.array
    else:
        arr = np.asarray(mask)
        if arr.shape != vol.shape:
            raise InvalidInputError(f"{name} has shape {arr.shape} but its image has shape {vol.shape}",
                                    fix="pass a boolean array on the image's grid, or a mask Volume")
    arr = arr != 0
    if not arr.any():
        raise RegistrationError(f"{name} covers no voxel (it is all zero)",
                                fix="pass a mask with the region to align, or mask=None to use the whole image")
    return vol.with_array(arr.astype(np.uint8), unit="arbitrary")


def _boxes_intersect(a: Volume, b: Volume) -> bool:
    amin, amax = _edges(a)
    bmin, bmax = _edges(b)
    return bool(np.all(amin <= bmax) and np.all(bmin <= amax))


def _edges(v: Volume):
    s = np.asarray(v.shape)
    corners = np.array([[i, j, k] for i in (-0.5, s[0] - 0.5) for j in (-0.5, s[1] - 0.5) for k in (-0.5, s[2] - 0.5)])
    w = v.index_to_world(corners)
    return w.min(axis=0), w.max(axis=0)


# --------------------------------------------------------------------------- working images
def _working(vol: Volume, spacing_mm: float):
    """Float32 SimpleITK image, anti-alias smoothed and resampled to ``spacing_mm`` if coarser than native."""
    import SimpleITK as sitk

    img = sitk.Cast(vol.to_sitk(), sitk.sitkFloat32)
    sp = np.asarray(img.GetSpacing())
    target = np.maximum(sp, spacing_mm)
    if np.allclose(target, sp, rtol=0.05):
        return img
    sigma = np.sqrt(np.maximum(target ** 2 - sp ** 2, 0)) / 2.355  # FWHM of the target voxel
    img = sitk.SmoothingRecursiveGaussian(img, [float(max(s, 1e-3)) for s in sigma])
    size = [max(4, int(round(n * s / t))) for n, s, t in zip(img.GetSize(), sp, target)]
    out = sitk.Image(size, sitk.sitkFloat32)
    out.SetSpacing([float(t) for t in target])
    out.SetDirection(img.GetDirection())
    # Keep the outer edge of the field of view.
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    edge = np.asarray(img.GetOrigin()) - d @ (sp / 2)
    out.SetOrigin([float(x) for x in edge + d @ (target / 2)])
    return sitk.Resample(img, out, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _working_mask(mask: Optional[Volume], ref_img):
    import SimpleITK as sitk

    if mask is None:
        return None
    m = sitk.Resample(mask.to_sitk(), ref_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if sitk.GetArrayViewFromImage(m).max() == 0:
        m = sitk.Resample(mask.to_sitk(), ref_img, sitk.Transform(), sitk.sitkLinear, 0, sitk.sitkFloat32) > 0
    return sitk.Cast(m, sitk.sitkUInt8)


# --------------------------------------------------------------------------- helpers
class _Monitor:
    """Counts iterations per level, reports progress, stops on cancel."""

    def __init__(self, reg, n_levels: int, iterations, progress, cancel, lo: float, hi: float, stage: str):
        self.reg, self.n, self.its = reg, n_levels, iterations
        self.progress, self.cancel, self.lo, self.hi, self.stage = progress, cancel, lo, hi, stage
        self.per_level: List[int] = []
        self.cancelled = False

    def level(self):
        self.per_level.append(0)
        lvl = len(self.per_level)
        report(self.progress, self.lo + (self.hi - self.lo) * (lvl - 1) / self.n, f"{self.stage}: level {lvl}/{self.n}")

    def iteration(self):
        if not self.per_level:
            self.per_level.append(0)
        self.per_level[-1] += 1
        lvl = len(self.per_level)
        frac = min(1.0, self.per_level[-1] / max(1, self.its[min(lvl, len(self.its)) - 1]))
        report(self.progress, self.lo + (self.hi - self.lo) * (lvl - 1 + frac) / self.n,
               f"{self.stage}: level {lvl}/{self.n}, iteration {self.per_level[-1]}")
        if self.cancel is not None and self.cancel.cancelled:
            self.cancelled = True
            self.reg.StopRegistration()


def _set_metric(reg, metric: str, bins: int, samples: int, n_voxels: int, seed: int):
    import SimpleITK as sitk

    if metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    else:
        reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(min(1.0, samples / max(1, n_voxels))), int(seed) + 1)
    reg.SetInterpolator(sitk.sitkLinear)


def _evaluate(fixed, moving, tx, *, metric, bins, seed, fmask=None, mmask=None) -> Optional[float]:
    """Metric of ``tx`` on the given images with a fixed sample set (comparable between transforms)."""
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    n = int(np.prod(fixed.GetSize()))
    _set_metric(reg, metric, bins, 60000, n, seed)
    if fmask is not None:
        reg.SetMetricFixedMask(fmask)
    if mmask is not None:
        reg.SetMetricMovingMask(mmask)
    reg.SetInitialTransform(tx, inPlace=False)
    try:
        return float(reg.MetricEvaluate(fixed, moving))
    except RuntimeError:
        return None  # too few samples inside the moving image


def _rigid_matrix_stats(m: np.ndarray):
    lin = m[:3, :3]
    u, s, vt = np.linalg.svd(lin)
    rot = u @ vt
    c = (np.trace(rot) - 1) / 2
    return math.degrees(math.acos(max(-1.0, min(1.0, c)))), float(np.linalg.norm(m[:3, 3])), s


def _working_from_sitk(img, spacing_mm: float):
    v = Volume.from_sitk(img)
    return _working(v, spacing_mm)


# --------------------------------------------------------------------------- stages
def _initialise(fixed, moving, *, mode, preset, metric, seed, fmask, mmask, cancel):
    """Centre/moments initialiser then a coarse multi-start over rotations; returns (Euler3DTransform, label)."""
    import SimpleITK as sitk

    geo = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                            sitk.CenteredTransformInitializerFilter.GEOMETRY)
    if mode == "none":
        t = sitk.Euler3DTransform()
        t.SetCenter(geo.GetCenter())
        return t, "none"
    if mode == "geometry":
        return sitk.Euler3DTransform(geo), "geometry"
    cands = [("geometry", sitk.Euler3DTransform(geo))]
    try:
        mom = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
        cands.append(("moments", sitk.Euler3DTransform(mom)))
    except RuntimeError:
        pass
    if mode == "moments":
        return cands[-1][1], cands[-1][0]
    # Multi-start on a coarse copy: catches a 30 degree tilt that gradient descent alone would miss.
    coarse_mm = max(preset["levels_mm"][0], 6.0)
    fc, mc = _working_from_sitk(fixed, coarse_mm), _working_from_sitk(moving, coarse_mm)
    fmc = _working_mask_img(fmask, fc)
    mmc = _working_mask_img(mmask, mc)
    a = math.radians(preset["multistart_deg"])
    angles = (-a, 0.0, a)
    scored = []
    for name, base in cands:
        for rx, ry, rz in itertools.product(angles, angles, angles):
            if cancel is not None and cancel.cancelled:
                raise CancelledError("registration was cancelled")
            t = sitk.Euler3DTransform(base)
            t.SetRotation(rx, ry, rz)
            v = _evaluate(fc, mc, t, metric=metric, bins=preset["histogram_bins"], seed=seed, fmask=fmc, mmask=mmc)
            if v is not None:
                scored.append((v, name, t))
    if not scored:
        return cands[-1][1], cands[-1][0]
    scored.sort(key=lambda s: s[0])
    # Polish the best few briefly at the coarse level; gradient descent picks the true basin.
    best = None
    for v0, name, t in scored[:4]:
        reg = sitk.ImageRegistrationMethod()
        _set_metric(reg, metric, preset["histogram_bins"], preset["samples"], int(np.prod(fc.GetSize())), seed)
        if fmc is not None:
            reg.SetMetricFixedMask(fmc)
        if mmc is not None:
            reg.SetMetricMovingMask(mmc)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=4.0, minStep=0.1, numberOfIterations=40,
                                                     relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
        reg.SetOptimizerScalesFromPhysicalShift()
        tt = sitk.Euler3DTransform(t)
        reg.SetInitialTransform(tt, inPlace=True)
        try:
            reg.Execute(fc, mc)
        except RuntimeError:
            continue
        v = _evaluate(fc, mc, tt, metric=metric, bins=preset["histogram_bins"], seed=seed, fmask=fmc, mmask=mmc)
        if v is not None and (best is None or v < best[0]):
            best = (v, name, tt)
    if best is None:
        return scored[0][2], scored[0][1] + "+multistart"
    return best[2], best[1] + "+multistart"


def _working_mask_img(mask_img, ref_img):
    import SimpleITK as sitk

    if mask_img is None:
        return None
    m = sitk.Resample(mask_img, ref_img, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32) > 0.25
    return sitk.Cast(m, sitk.sitkUInt8)


def _optimise(fixed, moving, initial, *, preset, metric, seed, fmask, mmask, monitor_args, bspline=False,
              moving_initial=None):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    w = float(min(fixed.GetSpacing()))
    levels = preset["bspline_levels_mm"] if bspline else preset["levels_mm"]
    its = preset["bspline_iterations"] if bspline else preset["iterations"]
    shrink = [max(1, int(round(l / w))) for l in levels]
    sigmas = list(preset["smoothing_vox"][-len(levels):]) if not bspline else [0.5, 0.0][-len(levels):]
    n_fine = int(np.prod(fixed.GetSize()))
    samples = preset["bspline_samples"] if bspline else preset["samples"]
    _set_metric(reg, metric, preset["histogram_bins"], samples, n_fine // (shrink[-1] ** 3), seed)
    # Same number of samples at every level (percentage scaled by the shrink).
    reg.SetMetricSamplingPercentagePerLevel(
        [float(min(1.0, samples * f ** 3 / max(1, n_fine))) for f in shrink], int(seed) + 1)
    if fmask is not None:
        reg.SetMetricFixedMask(fmask)
    if mmask is not None:
        reg.SetMetricMovingMask(mmask)
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    if bspline:
        reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=int(max(its)),
                                 maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=int(max(its)) * 4,
                                 costFunctionConvergenceFactor=1e7)
    else:
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=float(preset["learning_rate_mm"]), minStep=float(preset["min_step_mm"]),
            numberOfIterations=int(max(its)), relaxationFactor=float(preset["relaxation"]),
            gradientMagnitudeTolerance=1e-8)
        reg.SetOptimizerScalesFromPhysicalShift()
    if moving_initial is not None:
        reg.SetMovingInitialTransform(moving_initial)
    reg.SetInitialTransform(initial, inPlace=True)
    mon = _Monitor(reg, len(shrink), its, *monitor_args)
    import SimpleITK as _s

    reg.AddCommand(_s.sitkMultiResolutionIterationEvent, mon.level)
    reg.AddCommand(_s.sitkIterationEvent, mon.iteration)
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as e:
        if mon.cancelled:
            raise CancelledError("registration was cancelled") from None
        msg = str(e)
        if "samples" in msg.lower() or "outside" in msg.lower():
            raise RegistrationError(
                "too few samples of the fixed image land inside the moving image during optimisation",
                fix="check that both images show the same anatomy; try initialise='geometry' or masks") from None
        raise RegistrationError(f"SimpleITK registration failed ({msg.strip().splitlines()[-1][:200]})",
                                fix="check the inputs' geometry and content") from None
    if mon.cancelled:
        raise CancelledError("registration was cancelled")
    return reg.GetOptimizerStopConditionDescription(), mon.per_level, its


# --------------------------------------------------------------------------- API
def register(fixed: Volume, moving: Volume, *, kind: str = "rigid", metric: str = "mattes",
             preset: Optional[str] = None, fixed_mask: Any = None, moving_mask: Any = None,
             progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None, seed: int = 0,
             initialise: str = "auto", bspline_grid_mm: Optional[float] = None,
             **preset_overrides: Any) -> RegistrationResult:
    """Register ``moving`` onto ``fixed``.

    Args:
        fixed: reference volume (its grid is the output grid).
        moving: volume to align.
        kind: ``"rigid"`` (6 dof), ``"affine"`` (12 dof) or ``"deformable"`` (affine + B-spline).
        metric: ``"mattes"`` (mutual information, any modality pair) or ``"correlation"`` (same modality).
        preset: ``"MR-CT"``, ``"MR-PT"``, ``"MR-NM"``, ``"CT-PT"``, ``"CT-NM"``, ``"MR-MR"`` or ``"default"``;
            chosen from the modalities when None.
        fixed_mask, moving_mask: optional region to use: a Volume or boolean array on that image's grid.
        progress: ``progress(fraction, message)``, called per level and per iteration.
        cancel: a :class:`~medfuse.progress.CancelToken`; registration stops promptly and raises CancelledError.
        seed: seed of the random metric sampling (equal seeds give equal results).
        initialise: ``"auto"`` (geometry centre, moments, then a multi-start over +-30 degree rotations),
            ``"geometry"``, ``"moments"`` or ``"none"`` (start from the scanners' world coordinates).
            ``"geometry"`` also allows images whose world boxes do not overlap (centre-aligns them).
        bspline_grid_mm: B-spline control-point spacing (regularisation: larger is smoother).
        **preset_overrides: any preset key (see :mod:`medfuse.registration.presets`).

    Returns:
        :class:`RegistrationResult`. ``report.suspect`` is True (with reasons) when the result should not be trusted.

    Raises:
        InvalidInputError: wrong types, 2-D inputs, NaN voxels, unknown options.
        RegistrationError: constant image, empty mask, no overlap, optimiser failure.
        CancelledError: the cancel token was set.
    """
    import SimpleITK as sitk

    t0 = time.perf_counter()
    if kind not in _KINDS:
        raise InvalidInputError(f"unknown registration kind {kind!r}", fix=f"use one of {', '.join(_KINDS)}")
    if metric not in _METRICS:
        raise InvalidInputError(f"unknown metric {metric!r}", fix=f"use one of {', '.join(_METRICS)}")
    if initialise not in _INITS:
        raise InvalidInputError(f"unknown initialise {initialise!r}", fix=f"use one of {', '.join(_INITS)}")
    fixed = _as_volume(fixed, "fixed")
    moving = _as_volume(moving, "moving")
    fmask_v = _as_mask(fixed_mask, fixed, "fixed_mask")
    mmask_v = _as_mask(moving_mask, moving, "moving_mask")
    if bspline_grid_mm is not None:
        preset_overrides["bspline_grid_mm"] = float(bspline_grid_mm)
    p = get_preset(preset, fixed.modality, moving.modality, **preset_overrides)
    if not _boxes_intersect(fixed, moving) and initialise != "geometry":
        raise RegistrationError(
            "the two volumes do not overlap at all in world coordinates (their fields of view are disjoint)",
            fix="check that they are the same patient and frame of reference; if they really show the same anatomy "
                "with unrelated scanner coordinates, pass initialise='geometry' to centre-align them first")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()))
    report(progress, 0.0, "preparing images")

    finest = float(p["levels_mm"][-1])
    fimg = _working(fixed, finest)
    mimg = _working(moving, finest)
    fmask = _working_mask(fmask_v, fimg)
    mmask = _working_mask(mmask_v, mimg)
    if cancel is not None:
        cancel.raise_if_cancelled("registration")

    # Metric before: the images as the scanners placed them (identity), on a fixed sample set.
    ident = sitk.Euler3DTransform()
    metric_before = _evaluate(fimg, mimg, ident, metric=metric, bins=p["histogram_bins"], seed=seed,
                              fmask=fmask, mmask=mmask)

    report(progress, 0.05, "initialising")
    init, init_label = _initialise(fimg, mimg, mode=initialise, preset=p, metric=metric, seed=seed,
                                   fmask=fmask, mmask=mmask, cancel=cancel)
    lin_hi = 0.6 if kind == "deformable" else 0.95
    stop, per_level, its = _optimise(fimg, mimg, init, preset=p, metric=metric, seed=seed, fmask=fmask, mmask=mmask,
                                     monitor_args=(progress, cancel, 0.2, lin_hi if kind == "rigid" else 0.4, "rigid"))
    linear = init
    if kind in ("affine", "deformable"):
        aff = sitk.AffineTransform(3)
        aff.SetCenter(init.GetCenter())
        aff.SetMatrix(init.GetMatrix())
        aff.SetTranslation(init.GetTranslation())
        stop2, per2, its2 = _optimise(fimg, mimg, aff, preset={**p, "levels_mm": p["levels_mm"][-2:],
                                                               "smoothing_vox": p["smoothing_vox"][-2:],
                                                               "iterations": p["iterations"][-2:]},
                                      metric=metric, seed=seed, fmask=fmask, mmask=mmask,
                                      monitor_args=(progress, cancel, 0.4, lin_hi, "affine"))
        stop, its = stop2, list(its) + list(its2[-2:])
        per_level = per_level + per2
        linear = aff
    transform = Transform(linear)
    jac_min = jac_frac = None
    if kind == "deformable":
        grid_mm = float(p["bspline_grid_mm"])
        phys = np.asarray(fimg.GetSize()) * np.asarray(fimg.GetSpacing())
        mesh = [max(1, int(round(x / grid_mm))) for x in phys]
        bs = sitk.BSplineTransformInitializer(fimg, mesh, order=3)
        stop3, per3, its3 = _optimise(fimg, mimg, bs, preset=p, metric=metric, seed=seed, fmask=fmask, mmask=mmask,
                                      monitor_args=(progress, cancel, lin_hi, 0.95, "deformable"), bspline=True,
                                      moving_initial=linear)
        stop = stop3
        per_level = per_level + per3
        its = list(its) + list(its3)
        transform = Transform(linear).compose(Transform(bs))
        jac_min, jac_frac = _jacobian(bs, fimg)

    metric_after = _evaluate(fimg, mimg, transform.sitk, metric=metric, bins=p["histogram_bins"], seed=seed,
                             fmask=fmask, mmask=mmask)
    report(progress, 0.96, "resampling")
    resampled = resample(moving, fixed, transform=transform)
    resampled.provenance["registration"] = {"kind": kind, "metric": metric, "preset": p["name"]}

    # ---------------------------------------------------------------- honesty
    reasons: List[str] = []
    hit_max = bool(per_level) and per_level[-1] >= int(its[-1]) or "Maximum number of iterations" in stop
    converged = not hit_max and "cancel" not in stop.lower()
    if not converged:
        reasons.append("the optimiser stopped at its iteration limit at the finest level without converging")
    if metric_after is None:
        reasons.append("too few overlapping samples after registration to evaluate the metric")
    elif metric_before is not None and metric_after > metric_before + 1e-6:
        reasons.append(f"the similarity got worse ({metric_before:.4f} before, {metric_after:.4f} after; lower is better)")
    overlap = _overlap_fraction(fimg, mimg, transform.sitk, fmask)
    if overlap < 0.25:
        reasons.append(f"only {overlap:.0%} of the fixed image maps inside the moving image")
    rot = trans = None
    scale = None
    if transform.is_linear or kind == "deformable":
        m = Transform(linear).matrix
        rot, trans, s = _rigid_matrix_stats(m)
        scale = [float(x) for x in s]
        if kind == "affine" and (np.any(s < 0.67) or np.any(s > 1.5)):
            reasons.append(f"implausible affine scaling {np.round(s, 3).tolist()} (outside 0.67-1.5)")
        if np.linalg.det(m[:3, :3]) <= 0:
            reasons.append("the linear transform flips the image (negative determinant)")
    if jac_min is not None and jac_min <= 0:
        reasons.append(f"the deformation folds: min Jacobian determinant {jac_min:.3f}, "
                       f"{jac_frac:.2%} of voxels <= 0; use a coarser bspline_grid_mm")
    rep = RegistrationReport(
        kind=kind, metric=metric, preset=p["name"], metric_before=metric_before, metric_after=metric_after,
        iterations_per_level=[int(x) for x in per_level], stop_reason=stop, seconds=time.perf_counter() - t0,
        converged=converged, suspect=bool(reasons), suspect_reasons=reasons, initialisation=init_label,
        rotation_deg=rot, translation_mm=trans, scale=scale, jacobian_min=jac_min,
        jacobian_fraction_nonpositive=jac_frac, overlap_fraction=overlap)
    report(progress, 1.0, "done")
    return RegistrationResult(transform=transform, resampled=resampled, report=rep,
                              linear_transform=Transform(linear))


def _jacobian(bspline, ref):
    import SimpleITK as sitk

    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(ref)
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    disp = f.Execute(bspline)
    jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(disp))
    return float(jac.min()), float(np.mean(jac <= 0))


def _overlap_fraction(fimg, mimg, tx, fmask) -> float:
    import SimpleITK as sitk

    ones = sitk.Image(mimg.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(mimg)
    inside = sitk.GetArrayFromImage(sitk.Resample(ones, fimg, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    if fmask is not None:
        m = sitk.GetArrayViewFromImage(fmask) > 0
        return float(inside[m].mean())
    return float(inside.mean())
