"""Resampling onto a reference grid, or onto a common grid chosen automatically.

Modality, unit and provenance survive; label maps use nearest neighbour.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from typing import Any, Iterator, List, Optional, Sequence

import numpy as np

from .. import _checks
from .._patient import different_patients_note
from ..errors import InvalidInputError, MedfuseWarning
from ..volume import Volume, affine_from_geometry

__all__ = ["resample", "resample_to_common_grid", "common_grid", "coverage"]

_INTERP = ("linear", "nearest", "bspline")


def _interpolator(name: str):
    import SimpleITK as sitk

    table = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}
    return table[_checks.choice(name, "interpolation", _INTERP)]


def _check_volume(v, name: str) -> Volume:
    if not isinstance(v, Volume):
        raise InvalidInputError(f"{name} must be a medfuse Volume, got {_checks.describe(v)}",
                                fix="load it with medfuse.load or wrap the array in medfuse.Volume(array, affine)")
    return v


def _volume_list(volumes, what: str = "volumes") -> List[Volume]:
    """``volumes`` as a list of Volumes, or a typed error saying what to pass.

    Why: ``not volumes`` on an array or a tensor is an ambiguous truth value, an int is not iterable, and a
    generator would be used up by the first pass over it.
    """
    if isinstance(volumes, Volume):
        raise InvalidInputError(f"{what} must be a list of Volumes, got a single Volume",
                                fix="pass a list, e.g. [fixed, moving], even for one volume: [volume]")
    vols = _checks.as_list(volumes, problem=f"{what} must be a list of medfuse Volumes",
                           fix="pass a list, e.g. [fixed, moving]; load files with medfuse.load(path) and wrap "
                               "arrays in medfuse.Volume(array, affine)")
    if not vols:
        raise InvalidInputError("no volumes given", fix="pass at least one Volume")
    return [_check_volume(v, f"{what}[{i}]") for i, v in enumerate(vols)]


def _is_label_map(v: Volume) -> bool:
    return v.array.dtype == bool


#: At most this many distinct values make an integer volume of unknown modality look like a label map or mask
#: (BraTS segmentations have 4, FreeSurfer's aseg a few dozen; a grey-level image has hundreds).
_LABEL_LIKE_VALUES = 64
#: Voxels looked at to count them: all of a volume up to 2 M voxels, a regular sample of a larger one.
_LABEL_SAMPLE = 2_000_000


#: The label-map warning's fix for resample(), whose interpolation= the caller sets.
_LABELS_FIX = ("pass interpolation='nearest' to keep the labels and their integer type, or interpolation='linear' "
               "to interpolate on purpose (this warning then goes away)")
#: ... and for register(), which has no interpolation= (its resampled image is linear): move the labels after.
LABELS_AFTER_REGISTER_FIX = ("register the image the labels were drawn on, then move the labels with its transform: "
                             "medfuse.resample(labels, fixed, transform=result.transform, interpolation='nearest')")


def _label_like_note(volume: Volume, fix: str = _LABELS_FIX) -> Optional[str]:
    """A warning when ``volume`` looks like a label map that linear interpolation would blend, else None
    (see :func:`label_map_description`).

    ``fix``: what the caller can do about it (register() takes no interpolation=, which the default names).
    """
    looks = label_map_description(volume)
    if looks is None:
        return None
    return (f"the volume looks like a label map or mask ({looks}), and linear interpolation gives values between "
            f"its labels at every edge. Fix: {fix}")


def label_map_description(volume: Volume, *, max_values: int = _LABEL_LIKE_VALUES) -> Optional[str]:
    """``"uint8, 3 distinct values: 0, 1, 2; modality unknown"`` when ``volume`` looks like a label map or mask
    (an integer volume of unknown modality with at most ``max_values`` values), else None.

    Only integer volumes of unknown modality are looked at: an MR, CT, PET or SPECT image is an image.
    """
    arr = volume.array
    if arr.dtype.kind not in "iu" or volume.modality != "unknown" or arr.size == 0:
        return None
    flat = arr.reshape(-1)
    step = max(1, flat.size // _LABEL_SAMPLE)
    while math.gcd(step, arr.shape[-1]) > 1:  # a step the last axis divides would see only a few planes
        step += 1
    values = np.unique(flat[::step])
    if values.size > max_values:
        return None
    shown = ", ".join(str(int(x)) for x in values[:6]) + (", ..." if values.size > 6 else "")
    return f"{arr.dtype}, {values.size} distinct values: {shown}; modality unknown"


def piecewise_constant(arr: np.ndarray, share: float = 0.5) -> bool:
    """Whether neighbours along the last axis are equal for at least ``share`` of the pairs outside the background
    (the commonest value).

    Why: few distinct integer values alone also describe a low-count SPECT or PET in counts (every NIfTI loads
    as modality unknown), whose neighbours differ by noise (Poisson counts of mean 0.5 to 8: 0.10-0.20 of such
    pairs equal); a label map's regions are flat (a BraTS t1c thresholded into 4 speckled labels: 0.66; drawn
    segmentations more). Planes along the first axis are subsampled to about 64.
    """
    a = arr[:: max(1, arr.shape[0] // 64)]
    if a.size == 0:
        return False
    # The background is the commonest value, not always 0: a CT masked to -1024 outside the body counted its
    # air as flat regions (0.70 of pairs equal) and was shown as a label map (review).
    values, counts = np.unique(a, return_counts=True)
    background = values[int(np.argmax(counts))]
    x, y = a[..., 1:], a[..., :-1]
    inside = (x != background) | (y != background)
    n = int(np.count_nonzero(inside))
    return n > 0 and np.count_nonzero((x == y) & inside) >= share * n


def _source_image(volume: Volume, interpolation: str, default: float):
    """``volume`` as a SimpleITK image of a pixel type that holds both its values and ``default``.

    float16 (which SimpleITK refuses) becomes float32; linear/bspline interpolation works in float32 (or float64);
    nearest neighbour keeps the dtype unless ``default`` does not fit it (``-1024`` HU in an unsigned CT, a
    fractional default in an integer image), which would otherwise wrap around (``-1024`` -> ``64512``) or be
    truncated silently: the type is then widened (uint16 -> int32, uint8 -> int16, ...).
    """
    import SimpleITK as sitk

    arr = volume.array
    if arr.dtype == np.float16:
        volume = volume.with_array(arr.astype(np.float32))
    src = volume.to_sitk()
    if interpolation != "nearest":
        if src.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
            # 32- and 64-bit integers in float64: float32 holds whole numbers exactly only up to 2**24
            # (16777217 came back as 16777216).
            wide = arr.dtype.kind in "iu" and arr.dtype.itemsize >= 4
            src = sitk.Cast(src, sitk.sitkFloat64 if wide else sitk.sitkFloat32)
        return src
    dt = np.dtype(np.uint8 if arr.dtype == bool else volume.array.dtype)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        if not np.isfinite(default) or float(default) != round(default):  # NaN marks outside in floats only
            wide = np.dtype(np.float64 if dt.itemsize >= 4 else np.float32)
        elif not info.min <= default <= info.max:
            wide = np.promote_types(dt, np.min_scalar_type(int(default)))
        else:
            wide = dt
        if wide != dt:
            pid = {np.dtype(t): getattr(sitk, name) for t, name in (
                (np.int8, "sitkInt8"), (np.uint8, "sitkUInt8"), (np.int16, "sitkInt16"), (np.uint16, "sitkUInt16"),
                (np.int32, "sitkInt32"), (np.uint32, "sitkUInt32"), (np.int64, "sitkInt64"),
                (np.uint64, "sitkUInt64"), (np.float32, "sitkFloat32"))}
            src = sitk.Cast(src, pid.get(wide, sitk.sitkFloat64))
    return src


def _label_lookup(volume: Volume, default: float):
    """For nearest-neighbour resampling of 64-bit integers beyond 2**53: ``(index volume, values, default's
    index)``, else None. The resampled index gives the labels back exactly through ``values[index]``.

    Why: ITK's resampler passes every value through a double, which holds whole numbers exactly only up to 2**53
    (2**53 + 1 came back as 2**53, with no word).
    """
    arr = volume.array
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize != 8 or arr.size == 0 \
            or max(abs(int(arr.min())), abs(int(arr.max()))) <= 2 ** 53:
        return None
    info = np.iinfo(arr.dtype)
    if not (np.isfinite(default) and default == round(default) and info.min <= default <= info.max):
        raise InvalidInputError(
            f"the volume ({arr.dtype}) holds values above 2**53, and no type holds both them and default={default:g} "
            "exactly (its labels would change)",
            fix=f"pass a whole-number default within {arr.dtype}'s range (e.g. default=0) for nearest-neighbour "
                "resampling")
    values, index = np.unique(arr, return_inverse=True)
    fill = arr.dtype.type(int(default))
    at = int(np.searchsorted(values, fill))
    if at == values.size or values[at] != fill:
        values = np.insert(values, at, fill)
        index[index >= at] += 1
    return volume.with_array(index.reshape(arr.shape).astype(np.int32)), values, at


# Set by register() while it resamples its result: the different-patients warning was given at its start.
_patients_checked: contextvars.ContextVar = contextvars.ContextVar("medfuse_patients_checked", default=None)
#: Set while a :class:`FieldOfView` resamples its mask: a volume that misses the grid was warned about when it was
#: resampled, and its mask said it again at the user's fuse() line.
_overlap_said: contextvars.ContextVar = contextvars.ContextVar("medfuse_overlap_said", default=None)


#: Set while medfuse resamples an image only to fuse it or to feed a network (the fuse pipeline, the MONAI
#: transforms): the loss of a PET's maximum is said where an output may be measured (resample(), register()'s
#: result), not on every fusion, whose 0..1 output holds no SUV.
_not_measured: contextvars.ContextVar = contextvars.ContextVar("medfuse_not_measured", default=None)


@contextlib.contextmanager
def not_for_measuring() -> Iterator[None]:
    """Within it, :func:`resample` does not warn that a PET's maximum fell (see :data:`_not_measured`)."""
    token = _not_measured.set(True)
    try:
        yield
    finally:
        _not_measured.reset(token)


def same_frame_of_reference(a: Volume, b: Volume) -> Optional[bool]:
    """Whether two volumes lie in one DICOM frame of reference (one patient space, as one PET/CT session); None
    when either has none recorded (NIfTI, MetaImage, NRRD, or made in memory)."""
    frames = [v.provenance.get("frame_of_reference_uid") for v in (a, b)]
    return None if not all(frames) else frames[0] == frames[1]


#: The words :func:`_other_frame_note` is known by (the DICOM writer looks for them in a fusion's inherited warnings).
OTHER_FRAME_MARK = "different DICOM frames of reference"


def _is_fusion(volume: Volume) -> bool:
    """Whether ``volume`` was made by a fusion (its history holds a ``fuse`` step, kept through later resampling)."""
    return any(isinstance(h, dict) and h.get("step") == "fuse" for h in volume.provenance.get("history") or [])


def _other_frame_note(volume: Volume, reference: Volume) -> Optional[str]:
    """A warning when ``volume`` is put on ``reference``'s grid as it lies, yet the two DICOM series were
    acquired in different frames of reference (another session or scanner): their world coordinates are then
    unrelated, and the overlay is misaligned unless a transform says how they match.

    Only when both frames are known (DICOM); never with the UIDs in it (they identify the study).
    """
    if same_frame_of_reference(volume, reference) is not False:
        return None
    return (f"the two images come from {OTHER_FRAME_MARK} (another session or scanner), and "
            "were resampled without a transform: scanner coordinates do not match across frames, so they are "
            "likely misaligned; register them first (medfuse.register, or --register rigid on the command line)")


#: A PET maximum lowered by more than this share by resampling is warned about: SUVmax and SUVpeak read on the new
#: grid would be low (the sample PET onto the sample CT's grid, linear: -4.2 %; a probe's lesion: -5.9 % SUVmax,
#: -8 % SUVpeak); below it lie B-spline's losses (-0.9 % on the CT grid) and float rounding.
_MAX_DROP = 0.02
#: Units in which a PET's maximum is a measurement (SUVmax), not an arbitrary level.
_QUANTITATIVE_PET = ("SUVbw", "SUVlbm", "SUVbsa", "Bq/mL")


def _finite_max(a: np.ndarray) -> Optional[float]:
    """The largest finite value of ``a``; None when it holds none."""
    if not a.size:
        return None
    top = float(np.max(a, initial=-np.inf, where=np.isfinite(a))) if a.dtype.kind == "f" else float(a.max())
    return top if math.isfinite(top) else None


def _level(x: float) -> str:
    return f"{x:.2f}" if abs(x) < 1000 else f"{x:.0f}"


def _max_drop_note(volume: Volume, out: np.ndarray, interpolation: str) -> Optional[str]:
    """The warning's text when resampling a PET in SUV or Bq/mL lowered its maximum by more than
    :data:`_MAX_DROP` (interpolation blends the hottest voxel with its neighbours, or the grid leaves it out); else
    None. Nearest neighbour only picks voxels, so is not checked; the arrays are those already in memory."""
    if volume.modality != "PT" or volume.unit not in _QUANTITATIVE_PET or interpolation == "nearest":
        return None
    before = _finite_max(volume.array)
    after = _finite_max(out)
    if before is None or after is None or before <= 0 or after >= before * (1.0 - _MAX_DROP):
        return None
    return (f"resampling ({interpolation} interpolation) lowered the maximum from {_level(before)} to "
            f"{_level(after)} {volume.unit} ({(after - before) / before * 100:+.1f} %): interpolation blends a hot "
            "spot with its neighbours (or the new grid leaves the hottest part out), so SUVmax and SUVpeak read on "
            "this grid are low; measure SUVmax on the PET's own grid (medfuse measure PET --mask MASK --transform T)")


def _onto_grid(reference: Volume, transform, interpolator: int, fill: float):
    """A SimpleITK resampling filter onto ``reference``'s grid, set by its geometry alone (a reference image would
    allocate a byte a voxel for nothing), through ``transform`` (None: identity)."""
    import SimpleITK as sitk

    f = sitk.ResampleImageFilter()
    f.SetSize([int(n) for n in reference.shape])
    f.SetOutputSpacing(reference.spacing)
    f.SetOutputOrigin(reference.origin)
    f.SetOutputDirection(tuple(float(x) for x in reference.direction.ravel()))
    f.SetTransform(sitk.Transform(3, sitk.sitkIdentity) if transform is None else transform.sitk)
    f.SetInterpolator(interpolator)
    f.SetDefaultPixelValue(fill)
    return f


def _all_fill(arr: np.ndarray, fill: float) -> bool:
    """Whether every voxel of ``arr`` is ``fill`` (NaN included); a strided sample first, which a resampled image
    with any content almost always fails at once."""
    if arr.dtype.kind == "f":
        fill = arr.dtype.type(fill)  # as stored: 0.1 in float32 is not the float 0.1

    def same(a):
        return np.isnan(a) if np.isnan(fill) else a == fill
    # ravel(order="K"): a view of the transposed output (reshape(-1) copied the whole volume on every resample).
    if not bool(same(arr.ravel(order="K")[::997]).all()):
        return False
    return all(bool(same(arr[i:i + 8]).all()) for i in range(0, arr.shape[0], 8))  # slabs: no grid-sized mask


def _no_overlap_note(volume: Volume, reference: Volume, transform, out: np.ndarray, fill: float,
                     default: float) -> Optional[str]:
    """The warning's text when ``out`` (``volume`` resampled onto ``reference``) holds none of its voxels, else None.

    ``fill``: the fill value in ``out`` (a label lookup's index); ``default``: the fill value in ``volume``.

    Why: the result was then the fill value alone, returned with no word. Disjoint fields of view are told by
    :func:`coverage` (8 corners); overlapping boxes that still miss every output voxel (oblique grids, a sliver)
    by a nearest-neighbour resample of the moving grid's mask, only when ``out`` is all fill and ``volume`` is not
    (an image that is all background itself is not warned about).
    """
    import SimpleITK as sitk

    if coverage(volume, reference, transform=transform) > 0:
        whole = volume.array.dtype.kind in "iu" and float(default).is_integer()  # exact beyond 2**53
        if not out.size or not _all_fill(out, fill) or _all_fill(volume.array, int(default) if whole else default):
            return None
        ones = Volume(np.ones(volume.shape, dtype=np.uint8), volume.affine).to_sitk()
        f = _onto_grid(reference, transform, sitk.sitkNearestNeighbor, 0.0)
        hit = f.Execute(ones)  # kept in a name: a view of a temporary image read freed memory
        if sitk.GetArrayViewFromImage(hit).any():
            return None
    how = "as placed" if transform is None else "through the transform"
    return (f"the resampled image holds none of the volume's voxels: {how}, the volume misses every voxel of the "
            f"reference's grid, which holds only the fill value ({default:g}). Check that the two images belong "
            "together and the transform's direction (it maps reference points to volume points); if they show the "
            "same anatomy in unrelated scanner coordinates, register them first: medfuse.register(reference, volume, "
            "initialise='geometry')")


class FieldOfView:
    """Where a volume resampled onto a reference grid through ``transform`` has voxels of its own: :meth:`mask`.

    Why: outside that region it is only the fill value, and percentiles over the whole grid then depended on how
    much of it the image covered: a SPECT on a whole-body CT's grid (1 % of it) had 39 % of its voxels clipped to
    1, its perfusion contrast gone, while on its own grid the scale is the image's. :func:`resample` gives its
    result one (``_field_of_view``), which the pipeline's normalisation and :func:`medfuse.fuse` use for the
    rules that take percentiles. Computed only when asked: a PET in SUV or a CT in HU (fixed windows) needs none,
    and the mask costs as much as resampling the image. Holds the two grids' geometry and the transform, no
    voxels.

    Args:
        shape, affine: the volume's own grid.
        ref: the reference grid (a Volume; only its shape and affine are kept).
        transform: as :func:`resample` took it (None: as placed).
    """

    def __init__(self, shape: Sequence[int], affine: np.ndarray, ref: Volume, transform: Any):
        self.shape, self.affine, self.transform = tuple(int(n) for n in shape), np.asarray(affine), transform
        self.ref_shape, self.ref_affine = tuple(ref.shape), np.asarray(ref.affine)

    def mask(self) -> Optional[np.ndarray]:
        """The bool mask on the reference grid, or None when the volume covers the whole grid."""
        # No provenance: no frame-of-reference or patient warning can come of it (and no catch_warnings, which
        # swaps process-wide state under a batch's other threads and drops their warnings). The reference is
        # its geometry alone: a broadcast array holds no voxels.
        ones = Volume(np.ones(self.shape, dtype=bool), self.affine, modality="unknown", unit="arbitrary")
        grid = Volume(np.broadcast_to(np.False_, self.ref_shape), self.ref_affine, modality="unknown",
                      unit="arbitrary")
        said = _overlap_said.set(True)
        try:
            m = resample(ones, grid, transform=self.transform).array
        finally:
            _overlap_said.reset(said)
        return None if bool(m.all()) else np.asarray(m, dtype=bool)


def resample(volume: Volume, reference: Volume, *, transform=None, interpolation: Optional[str] = None,
             default: Optional[float] = None) -> Volume:
    """Resample ``volume`` onto ``reference``'s grid.

    Args:
        volume: the image to resample (moving space).
        reference: the grid to sample on (fixed space); only its geometry is used.
        transform: a :class:`~medfuse.registration.transforms.Transform` mapping reference (fixed) points to
            ``volume`` (moving) points; identity when ``None``.
        interpolation: ``"linear"`` (the default, None), ``"nearest"`` (label maps, masks), or ``"bspline"``
            (its overshoot clipped to the input's range and ``default``). Boolean volumes always use nearest
            neighbour. Linear and B-spline work in float32, or float64 for float64 and 32/64-bit integer volumes.
            Left out, an integer volume of unknown modality with at most 64 distinct values (a label map or
            mask) is still interpolated linearly, with a ``MedfuseWarning`` that says to choose.
        default: value outside ``volume``; default: -1024 for CT in HU, else 0 (False for boolean volumes, which
            take only False/True, 0 or 1).
            An integer volume resampled with nearest neighbour is widened when its type cannot hold it
            (``-1024`` in a uint16 CT comes back as int32, not as a wrapped-around 64512).

    Returns:
        A Volume on the reference grid with ``volume``'s modality, unit, dtype (floats for linear/bspline of
        integers) and provenance, plus a ``resampled`` history entry. With a transform it takes the reference's
        frame of reference (it now lies in that patient space); without one it keeps its own, and a
        ``MedfuseWarning`` says so when the two DICOM frames of reference differ. It remembers where it has
        voxels of its own (a :class:`FieldOfView`; not copied by ``with_array``), over which :func:`medfuse.fuse`
        takes the percentiles of its normalisation.

    Raises:
        InvalidInputError: a ``volume`` or ``reference`` that is not a Volume, a complex ``volume``, a
            ``transform`` that is not a 3-D (medfuse or SimpleITK) transform, an unknown ``interpolation``, a
            ``default`` that is not a number (or, for a boolean volume, not 0 or 1).
    """
    import SimpleITK as sitk

    from .transforms import Transform

    _check_volume(volume, "volume")
    _check_volume(reference, "reference")
    if np.iscomplexobj(volume.array):  # SimpleITK's cast refused it with a bare RuntimeError
        raise InvalidInputError(f"the volume is complex ({volume.array.dtype}); resampling takes real voxels",
                                fix="resample its magnitude (volume.with_array(np.abs(volume.array))), or its real "
                                    "and imaginary parts one at a time")
    if transform is not None and not isinstance(transform, Transform):
        transform = Transform(transform)
    if _is_label_map(volume):
        interpolation = "nearest"
    labels_note = None
    if interpolation is None:
        interpolation = "linear"
        labels_note = _label_like_note(volume)
        if labels_note is not None:
            warnings.warn(labels_note, MedfuseWarning, stacklevel=_checks.user_stacklevel())
    interp = _interpolator(interpolation)
    is_ct_hu = volume.modality == "CT" and volume.unit == "HU" and volume.array.dtype != bool
    if default is None:  # a mask or label map is False outside, whatever modality and unit it carries
        default = -1024.0 if is_ct_hu else 0.0
    if not isinstance(default, (bool, np.bool_)):  # False is a mask's outside; a str fails in float() otherwise
        default = _checks.number(default, "default", finite=False, example="default=0 (the value outside the image)")
    if volume.array.dtype == bool:
        if float(default) not in (0.0, 1.0):  # 7 became True: the outside of a mask marked as inside
            raise InvalidInputError(f"a mask's default (the value outside it) must be False or True, got "
                                    f"{float(default):g}", fix="pass default=False (or leave it out)")
        default = float(bool(default))
    infinite = volume.array.dtype.kind == "f" and bool(np.isinf(volume.array).any())
    if interpolation == "bspline" and volume.array.dtype.kind == "f" and not np.isfinite(volume.array).all():
        # The B-spline prefilter runs along whole rows: one NaN voxel made most of a volume NaN, the rest 0.
        raise InvalidInputError(f"the volume holds {int((~np.isfinite(volume.array)).sum())} NaN or infinite "
                                "voxel(s), which B-spline interpolation spreads over the whole volume",
                                fix="use interpolation='linear' (a NaN then marks only its neighbours) or replace "
                                    "them first: volume.with_array(np.nan_to_num(volume.array, nan=0.0, "
                                    "posinf=0.0, neginf=0.0))")
    lookup = _label_lookup(volume, float(default)) if interpolation == "nearest" else None
    if lookup is None:
        src = _source_image(volume, interpolation, float(default))
    else:
        src = _source_image(lookup[0], interpolation, float(lookup[2]))
    f = _onto_grid(reference, transform, interp, float(default) if lookup is None else float(lookup[2]))
    f.SetOutputPixelType(src.GetPixelID())
    out = f.Execute(src)
    del src  # the source's float32 copy is not needed while the output is copied out
    arr = np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))
    del out
    # Before the lookup: its index array holds the fill value exactly.
    empty_note = None if _overlap_said.get() else _no_overlap_note(
        volume, reference, transform, arr, float(default) if lookup is None else lookup[2], float(default))
    if lookup is not None:
        arr = lookup[1][arr]
    if infinite and arr.dtype.kind == "f":
        # ITK clamps each output value to its pixel type's range: an infinite voxel came back as +-3.4e38, a
        # finite value no NaN/inf check catches. Values at the type's limit that the input did not hold are
        # those.
        top = np.finfo(arr.dtype).max
        for sign in (1, -1):
            if not (volume.array == sign * top).any():
                arr[arr == sign * top] = sign * np.inf
    if volume.array.dtype == bool:
        arr = arr.astype(bool)
    elif interpolation == "bspline" and arr.size:
        # Cubic B-splines overshoot at edges (SUV -0.06 beside a hot spot, -1122 HU below air): kept within the
        # input's range (and the fill value), which no interpolation between its values can leave.
        lo, hi = float(np.nanmin(volume.array)), float(np.nanmax(volume.array))
        if np.isfinite(default):
            lo, hi = min(lo, float(default)), max(hi, float(default))
        np.clip(arr, lo, hi, out=arr)
    prov = dict(volume.provenance)
    if labels_note is not None:  # the result's sidecar keeps it too
        prov["warnings"] = [*prov.get("warnings", []), labels_note]
    max_note = None if _not_measured.get() else _max_drop_note(volume, arr, interpolation)
    if max_note is not None:
        warnings.warn(max_note, MedfuseWarning, stacklevel=_checks.user_stacklevel())
        prov["warnings"] = [*prov.get("warnings", []), max_note]
    # The output's world coordinates are the reference's, so its NIfTI space is the reference's too.
    prov.pop("nifti_space", None)
    if "nifti_space" in reference.provenance:
        prov["nifti_space"] = reference.provenance["nifti_space"]
    if transform is not None:  # registered into the reference's patient space (and study)
        # The study too: the moving image's study beside the reference's frame of reference said that the moving
        # study's images lie on the fixed grid.
        for key in ("frame_of_reference_uid", "study_uid"):
            prov.pop(key, None)
            if reference.provenance.get(key):
                prov[key] = reference.provenance[key]
        if not _is_fusion(volume):
            # An earlier placement without a transform (warned about then) is replaced by this one: the note no
            # longer holds, and kept it made the writer refuse a registered image. A fusion's inherited notes stay:
            # one transform of the fused image does not align its inputs with one another.
            kept = [w for w in prov.get("warnings") or [] if OTHER_FRAME_MARK not in str(w)]
            if len(kept) != len(prov.get("warnings") or []):
                prov["warnings"] = kept
    else:
        note = _other_frame_note(volume, reference)
        if note is not None:
            warnings.warn(note, MedfuseWarning, stacklevel=2)
            prov["warnings"] = [*prov.get("warnings", []), note]
    if empty_note is not None:
        warnings.warn(empty_note, MedfuseWarning, stacklevel=_checks.user_stacklevel())
        prov["warnings"] = [*prov.get("warnings", []), empty_note]
    patients = different_patients_note(volume.provenance, reference.provenance)
    if patients is not None and patients not in prov.get("warnings", []):
        if _patients_checked.get() is None:  # else register() said it already, at its start
            warnings.warn(patients, MedfuseWarning, stacklevel=2)
        prov["warnings"] = [*prov.get("warnings", []), patients]  # the result's sidecar keeps it
    res = Volume(arr, reference.affine.copy(), modality=volume.modality, unit=volume.unit, provenance=prov)
    res.provenance["history"] = list(volume.provenance.get("history", []))
    # Everything that sets the voxels, so that the history alone reproduces them: the fill value, the whole
    # reference grid (origin and directions too: a 7 mm shift changed the voxels but not the record) and a linear
    # transform's matrix (its class name alone said nothing of where it moved the image).
    extra = {} if transform is None or not transform.is_linear else {
        "transform_matrix": [[round(float(x), 9) for x in row] for row in transform.matrix]}
    res.add_history("resample", interpolation=interpolation, transform=None if transform is None else transform.sitk.GetName(),
                    shape=list(reference.shape), spacing=[round(s, 6) for s in reference.spacing],
                    reference_affine=[[round(float(x), 6) for x in row] for row in reference.affine],
                    fill=float(default) if np.isfinite(default) else str(float(default)), **extra)  # JSON: "nan"
    res.provenance["resampled"] = True
    if volume.array.dtype != bool:  # a mask's own field of view is of no use (and FieldOfView resamples masks)
        object.__setattr__(res, "_field_of_view", FieldOfView(volume.shape, volume.affine, reference, transform))
    return res


#: Below this share of the reference's field of view, an image resampled onto it without a registration is warned
#: about (callers: the fusion pipeline, the MONAI transforms that resample).
LOW_COVERAGE = 0.2


def coverage_note(volume: Volume, reference: Volume, *, what: str, view: str, tail: str, fix: str) -> Optional[str]:
    """Refuse ``volume`` when it lies wholly outside ``reference``; the warning's text when it covers little.

    Why: resampled there it is only the background value, so a "fusion" with it was the reference alone, with no
    word. The caller warns with the text (and records it); ``None`` when the coverage is not low.

    Args:
        volume, reference: as for :func:`coverage` (no transform: the two are resampled as placed).
        what: the image, in the caller's words ("input 2", "'t2'").
        view: the reference's field of view, in the caller's words ("the fixed image's field of view").
        tail: what a low coverage means for the caller's output.
        fix: the fix for the refusal.

    Raises:
        GeometryError: the two fields of view do not meet at all.
    """
    from ..errors import GeometryError

    share = coverage(volume, reference)
    if share == 0:
        raise GeometryError(f"{what} lies wholly outside {view} (world coordinates); resampled onto that grid it "
                            "would be empty", fix=fix)
    if share >= LOW_COVERAGE:
        return None
    # Below 1 %, "0%" read as no coverage at all, which is refused above.
    pct = f"{share:.0%}" if share >= 0.01 else f"{100 * share:.2g}%"
    return f"{what} covers only {pct} of {view}; {tail}"


def _world_box(corners: np.ndarray):
    return corners.min(axis=0), corners.max(axis=0)


def _grid_corners(v: Volume) -> np.ndarray:
    """The 8 world (LPS mm) corners of ``v``'s voxels, their edges included."""
    s = np.asarray(v.shape[:3], dtype=float)
    return v.index_to_world(np.array([[i, j, k] for i in (-0.5, s[0] - 0.5) for j in (-0.5, s[1] - 0.5)
                                      for k in (-0.5, s[2] - 0.5)]))


def coverage(volume: Volume, reference: Volume, *, transform=None) -> float:
    """About how much of ``reference``'s field of view ``volume`` covers once resampled onto it (0..1).

    Why: resampled where it has no voxels, an image is only its background value, so a "fusion" with an image that
    misses the reference (or meets it in one slice) was the reference alone, with no word. Callers refuse 0 and
    warn on little. The boxes are axis-aligned around each grid, so 0 is exact (disjoint boxes never meet) and
    other values are an upper bound for oblique grids.

    Args:
        volume: the image to be resampled (moving space).
        reference: the grid it would be resampled onto (fixed space).
        transform: as for :func:`resample`: a Transform mapping reference points to ``volume``'s points (None:
            identity). A deformable one is not judged: 1.0.

    Returns:
        The share of the reference's box that lies inside ``volume``'s box, 0.0 to 1.0.

    Raises:
        InvalidInputError: ``volume`` or ``reference`` is not a Volume, or ``transform`` is not a transform.
    """
    from .transforms import Transform

    _check_volume(volume, "volume")
    _check_volume(reference, "reference")
    corners = _grid_corners(reference)
    if transform is not None:
        if not isinstance(transform, Transform):
            transform = Transform(transform)
        if not transform.is_linear:
            return 1.0
        corners = transform.transform_points(corners)
    (a0, a1), (b0, b1) = _world_box(corners), _world_box(_grid_corners(volume))
    overlap = np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None)
    return float(np.prod(overlap) / np.prod(np.maximum(a1 - a0, 1e-12)))


#: Orientation letters: the LPS world axis each names and the sign of the direction it points to.
_AXIS_LETTERS = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
_ORIENTATION_FIX = ("give three letters, one of L/R, one of A/P and one of S/I, naming where the voxel axes i, j and k "
                    "point to (nibabel's aff2axcodes convention): e.g. 'RAS' (NIfTI, MNI, nnU-Net), 'LPS' (DICOM, "
                    "ITK), 'LAS' (the SPM templates) or 'RPI'")
#: A common grid of more voxels than this is refused: 8.6 G voxels are 34 GB per float32 volume, and a spacing typed
#: in the wrong unit (0.001 for 1 mm) asked for 10**15.
_MAX_GRID_VOXELS = 2 ** 33


def _orientation_direction(orientation: Any) -> np.ndarray:
    """The axis-aligned 3x3 LPS direction matrix (columns along i, j, k) of a code such as ``"RAS"``.

    Raises:
        InvalidInputError: not a str of three letters, one of each pair L/R, A/P, S/I.
    """
    if not isinstance(orientation, str):
        raise InvalidInputError(f"orientation must be a 3-letter code, got {_checks.describe(orientation)}",
                                fix=_ORIENTATION_FIX)
    code = orientation.strip().upper()
    unknown = sorted({c for c in code if c not in _AXIS_LETTERS})
    worlds = [_AXIS_LETTERS[c][0] for c in code if c in _AXIS_LETTERS]
    pairs = ("L/R", "A/P", "S/I")
    if unknown:
        verb = "is not an axis letter" if len(unknown) == 1 else "are not axis letters"
        why = f"{', '.join(repr(c) for c in unknown)} {verb}"
    elif len(code) != 3:
        why = f"it has {len(code)} letters, not 3"
    elif sorted(worlds) != [0, 1, 2]:
        twice = sorted({pairs[w] for w in worlds if worlds.count(w) > 1})
        missing = [pairs[w] for w in range(3) if w not in worlds]
        why = f"it names the {' and '.join(twice)} axis twice and no {' or '.join(missing)} letter"
    else:
        d = np.zeros((3, 3))
        for axis, c in enumerate(code):
            world, sign = _AXIS_LETTERS[c]
            d[world, axis] = sign
        return d
    raise InvalidInputError(f"orientation {_checks.label(orientation)} is not an orientation code: {why}",
                            fix=_ORIENTATION_FIX)


def _grid_spacing(spacing: Any) -> np.ndarray:
    """``spacing`` (one number, or three along the output's i, j, k) as 3 positive finite mm, or a typed error."""
    example = "spacing=1.0 (1 mm isotropic) or spacing=(1.0, 1.0, 2.0) (mm along the output's i, j, k)"
    try:
        ndim = np.ndim(spacing)  # 0 for a number, and for a str or any other object (refused as a number)
    except (TypeError, ValueError):  # a ragged list
        ndim = -1
    if ndim == 0 or isinstance(spacing, (str, bytes)):
        items = [spacing]
    else:
        items = list(np.asarray(spacing, dtype=object)) if ndim == 1 else None
        if items is None or len(items) != 3:
            got = f"{len(items)} number{'' if len(items) == 1 else 's'}" if items is not None \
                else _checks.describe(spacing)
            raise InvalidInputError(f"spacing must be one number (isotropic) or 3 numbers (mm along the output's i, "
                                    f"j, k), got {got}", fix=f"pass e.g. {example}")
    mm = [_checks.number(x, "spacing", low=0, open_low=True, what="a finite voxel size in mm", example=example)
          for x in items]
    return np.array(mm * 3 if len(mm) == 1 else mm, dtype=float)


def common_grid(volumes: Sequence[Volume], *, reference_index: int = 0, spacing: Any = None,
                orientation: Optional[str] = None) -> Volume:
    """An empty grid covering ``volumes[reference_index]``'s field of view, by default at the finest spacing of all
    volumes and in the reference's orientation (direction).

    ``spacing`` and ``orientation`` fix the grid instead, as challenge datasets (BraTS, nnU-Net) require every
    subject's images on one spacing and axis order, e.g. ``common_grid([t1, flair], spacing=1, orientation="RAS")``
    for 1 mm isotropic RAS.

    Args:
        volumes: the volumes to cover; their finest voxel spacing becomes the grid's (isotropic) spacing unless
            ``spacing`` is given.
        reference_index: which of ``volumes`` sets the field of view, orientation and world (NIfTI space, DICOM
            frame of reference); negative indices count from the end.
        spacing: (keyword-only) the grid's voxel size in mm: one number (isotropic) or three, along the output's
            i, j, k (x, y, z of its voxel axes). The grid keeps the reference's outer edges, the far edge within
            half a voxel (the voxel count is rounded). None: the finest spacing of ``volumes``.
        orientation: (keyword-only) a 3-letter code naming the world direction each voxel axis i, j, k points
            *to*, as nibabel's ``aff2axcodes`` and :attr:`Volume.orientation` name it: ``"RAS"`` means i increases
            toward the patient's Right, j toward Anterior, k toward Superior (the NIfTI/MNI/nnU-Net layout);
            ``"LPS"`` is DICOM's and ITK's image layout. (ITK's ``SpatialOrientation`` names such as
            ``ITK_COORDINATE_ORIENTATION_RAI`` say where each axis comes *from*: its RAI is ``"LPS"`` here.) The
            grid is then axis-aligned in that orientation; an oblique reference gets the box around its 8 corners
            (every voxel of it covered, the box's spare part shared between both ends). None: the reference's
            direction.

    Returns:
        A uint8 Volume of zeros: only its geometry (shape and affine) and space labels are meant to be used, e.g. as
        ``resample``'s reference.

    Raises:
        InvalidInputError: ``volumes`` not a list (or other sequence) of Volumes, no volumes, an item that is not
            a Volume, a ``reference_index`` that is not a whole number or is out of range, a ``spacing`` that is
            not one or three positive finite numbers, an ``orientation`` that is not a code of one letter of each
            pair L/R, A/P, S/I, or a grid of more than 2**33 voxels (a spacing far too fine for the field of view).
    """
    vols = _volume_list(volumes)
    _checks.whole(reference_index, "reference_index", example="reference_index=0")
    if not (-len(vols) <= reference_index < len(vols)):
        raise InvalidInputError(f"reference_index {reference_index} is out of range for {len(vols)} volumes",
                                fix="pass the index of the fixed volume")
    ref = vols[reference_index]
    chosen = spacing is not None
    spacing = _grid_spacing(spacing) if chosen else np.full(3, min(min(v.spacing) for v in vols))
    if orientation is None:
        direction = ref.direction
        extent = (np.asarray(ref.shape) - 1) * np.asarray(ref.spacing)  # centre-to-centre field of view
        # Same outer edges: first and last voxel half a voxel inside the reference's edges.
        fov = extent + np.asarray(ref.spacing)
        counts = np.maximum(1, np.round(fov / spacing))
        start = ref.index_to_world([-0.5, -0.5, -0.5])
    else:
        direction = _orientation_direction(orientation)
        # The reference's corners along the new axes: its own edges when it is axis-aligned (a permutation or
        # flip of them), the box around it when it is oblique.
        along = _grid_corners(ref) @ direction
        low, fov = along.min(axis=0), np.ptp(along, axis=0)
        if ref.is_oblique:  # whole voxels over the whole box (rounding would cut corners), spare shared by both ends
            counts = np.maximum(1, np.ceil(fov / spacing - 1e-6))
            low = low - (counts * spacing - fov) / 2.0
        else:
            counts = np.maximum(1, np.round(fov / spacing))
        start = direction @ low
    if chosen and not float(np.prod(counts)) <= _MAX_GRID_VOXELS:
        raise InvalidInputError(f"spacing {' x '.join(f'{x:g}' for x in spacing)} mm over the reference's "
                                f"{' x '.join(f'{x:.0f}' for x in fov)} mm field of view gives "
                                f"{float(np.prod(counts)):.3g} voxels, more than {_MAX_GRID_VOXELS:.3g}",
                                fix="pass the spacing in mm, e.g. spacing=1 for 1 mm isotropic")
    shape = counts.astype(int)
    origin = start + direction @ (spacing / 2.0)
    aff = affine_from_geometry(spacing, origin, direction)
    # The grid lies in the reference's world, so it carries the reference's NIfTI space (resample passes it on).
    # ... and in its frame of reference: volumes from another frame are warned about when resampled onto it.
    space = {k: ref.provenance[k] for k in ("nifti_space", "frame_of_reference_uid") if ref.provenance.get(k)}
    return Volume(np.zeros(tuple(int(s) for s in shape), dtype=np.uint8), aff, provenance=space)


def resample_to_common_grid(volumes: Sequence[Volume], *, reference_index: int = 0,
                            interpolation: Optional[str] = None, spacing: Any = None,
                            orientation: Optional[str] = None) -> List[Volume]:
    """Resample every volume onto one grid covering the reference's field of view: by default at the finest spacing
    among them, in the reference's orientation; ``spacing`` and ``orientation`` fix it instead (e.g. ``spacing=1,
    orientation="RAS"`` for the 1 mm isotropic RAS grid of a BraTS/nnU-Net-style dataset).

    No registration is done: volumes are assumed to share a world frame (register first otherwise).
    Boolean volumes (masks, label maps) use nearest neighbour.

    Args:
        volumes: the volumes to resample, in one world frame.
        reference_index: which of ``volumes`` sets the field of view and orientation (see :func:`common_grid`).
        interpolation: ``"linear"`` (the default, None), ``"nearest"`` or ``"bspline"``, for the non-boolean
            volumes; left out, a volume that looks like an integer label map warns as in :func:`resample`.
        spacing: (keyword-only) the grid's voxel size in mm, one number (isotropic) or three along the output's
            i, j, k; None: the finest spacing of ``volumes`` (see :func:`common_grid`).
        orientation: (keyword-only) a 3-letter code (``"RAS"``, ``"LPS"``, ...) naming where i, j, k point *to*
            (nibabel's convention); None: the reference's direction (see :func:`common_grid`).

    Returns:
        One Volume per input, in order, all on the common grid; a volume already on it comes back as a copy.

    Raises:
        InvalidInputError: ``volumes`` not a list (or other sequence) of Volumes, no volumes, an item that is not
            a Volume, a ``reference_index`` that is not a whole number or is out of range, a ``spacing`` or
            ``orientation`` that :func:`common_grid` refuses, an unknown ``interpolation`` (noticed only when a
            non-boolean volume needs resampling).
    """
    volumes = _volume_list(volumes)  # once: a generator would be used up by common_grid
    grid = common_grid(volumes, reference_index=reference_index, spacing=spacing, orientation=orientation)
    out = []
    for v in volumes:
        if v.same_grid(grid):
            c = v.copy()
            # Not resampled, but now read in the reference's world all the same: the same space label.
            c.provenance.pop("nifti_space", None)
            if "nifti_space" in grid.provenance:
                c.provenance["nifti_space"] = grid.provenance["nifti_space"]
            out.append(c)
        else:
            out.append(resample(v, grid, interpolation="nearest" if v.array.dtype == bool else interpolation))
    return out
