"""A deterministic synthetic head phantom and the bundled sample volumes.

The phantom is built analytically (ellipsoids plus smooth noise for the cortical
folding) on a 1 mm MR grid in LPS millimetres centred on the head. From the one
tissue-label map it derives:

* ``ct``: CT in HU, 1 mm in-plane, 4 mm slices, same frame of reference as the MR;
* ``t1`` / ``t2``: MR T1- and T2-like contrasts (arbitrary units), 1 mm isotropic;
* ``pet``: FDG PET in SUVbw, 3 mm voxels, 6 mm FWHM blur, Poisson-like noise;
* ``spect``: perfusion SPECT in counts, 4.5 mm voxels, 10 mm FWHM blur.

PET and SPECT sit under a known rigid misalignment. The ground truth is stored as
4×4 LPS matrices mapping **MR-space physical points to PET/SPECT-space physical
points** (ITK "fixed -> moving"), so a registration of PET (moving) onto MR
(fixed) should recover exactly that matrix.

Regenerate the bundled files with::

    python -m medfuse.phantom --write sample_volumes --overwrite
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from ._checks import number, whole
from .errors import InvalidInputError, MedfuseError, OutputExistsError, UnreadableFileError
from .volume import Volume

__all__ = [
    "Phantom", "make_phantom", "lesion_contrast", "write_samples", "load_samples", "load_ground_truth",
    "default_samples_folder", "rigid_matrix", "LABELS", "PET_PATIENT", "main",
]

# ----------------------------------------------------------------------------- tissues
#: Tissue label codes of :attr:`Phantom.labels`.
LABELS = {
    "air": 0, "scalp": 1, "bone": 2, "csf": 3, "grey_matter": 4, "white_matter": 5,
    "deep_grey": 6, "ventricle": 7, "lesion_rim": 8, "lesion_core": 9,
}
_N_LABELS = len(LABELS)


def _table(values: Mapping[str, float]) -> np.ndarray:
    t = np.zeros(_N_LABELS, dtype=np.float32)
    for name, v in values.items():
        t[LABELS[name]] = v
    return t


# Nominal tissue values per contrast (label -> value).
_CT_HU = _table({"air": -1000, "scalp": 40, "bone": 1200, "csf": 5, "grey_matter": 40, "white_matter": 30,
                 "deep_grey": 42, "ventricle": 5, "lesion_rim": 55, "lesion_core": 35})
_T1 = _table({"scalp": 700, "bone": 80, "csf": 150, "grey_matter": 480, "white_matter": 760, "deep_grey": 540,
              "ventricle": 140, "lesion_rim": 900, "lesion_core": 380})
_T2 = _table({"scalp": 420, "bone": 50, "csf": 1000, "grey_matter": 620, "white_matter": 420, "deep_grey": 560,
              "ventricle": 1000, "lesion_rim": 700, "lesion_core": 850})
_PET_SUV = _table({"scalp": 1.0, "bone": 0.6, "csf": 0.3, "grey_matter": 8.0, "white_matter": 3.0, "deep_grey": 9.0,
                   "ventricle": 0.3, "lesion_rim": 16.0, "lesion_core": 20.0})
_SPECT = _table({"scalp": 12, "bone": 8, "csf": 4, "grey_matter": 100, "white_matter": 40, "deep_grey": 110,
                 "ventricle": 4, "lesion_rim": 65, "lesion_core": 50})

#: Patient and tracer facts written into the PET DICOM so that SUVbw comes out right.
PET_PATIENT = {
    "patient_weight_kg": 70.0,
    "injected_dose_bq": 250e6,
    "half_life_s": 6586.2,  # 18F
    "radiopharmaceutical": "Fluorodeoxyglucose",
    "radionuclide": "18F",
}

# Grids (LPS, identity direction, centred on the head centre unless stated).
_MR_SHAPE = (160, 192, 160)
_MR_SPACING = 1.0
_CT_SLAB = 4  # MR slices averaged into one CT slice (4 mm)
_PET_SHAPE, _PET_SPACING, _PET_FWHM = (64, 76, 64), 3.0, 6.0
_SPECT_SHAPE, _SPECT_SPACING, _SPECT_FWHM = (44, 52, 44), 4.5, 10.0

# Default misalignments: Euler angles (deg, about x, y, z; ITK Euler3D ZXY order) and translation (mm).
_DEFAULT_MISALIGN = {
    "pet": {"rotation_deg": (6.0, -4.0, 7.0), "translation_mm": (8.0, -6.0, 10.0)},
    "spect": {"rotation_deg": (-5.0, 7.0, -8.0), "translation_mm": (-11.0, 7.0, -6.0)},
}

SAMPLE_FILES = {
    "ct": "ct", "pet": "pet", "t1": "mr_t1.nii.gz", "t2": "mr_t2.nii.gz", "spect": "spect.nii.gz",
}


# ----------------------------------------------------------------------------- transforms
def rigid_matrix(rotation_deg: Sequence[float], translation_mm: Sequence[float],
                 *, center: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4×4 LPS matrix of an ITK ``Euler3DTransform`` (angles about x, y, z in degrees, ZXY order).

    Built through SimpleITK so that the matrix and the ``.tfm`` files agree exactly.

    Args:
        rotation_deg: ``(rx, ry, rz)``, degrees about x, y and z.
        translation_mm: ``(tx, ty, tz)``, mm.
        center: the centre of rotation, LPS mm.

    Returns:
        The 4×4 matrix (point in -> point out, LPS mm).

    Raises:
        InvalidInputError: an argument is not three finite numbers.
    """
    rotation_deg, translation_mm, center = (_three(v, name) for v, name in (
        (rotation_deg, "rotation_deg"), (translation_mm, "translation_mm"), (center, "center")))
    t = _euler(rotation_deg, translation_mm, center)
    m = np.eye(4)
    m[:3, :3] = np.asarray(t.GetMatrix()).reshape(3, 3)
    # ITK: y = R (x - c) + c + t
    c = np.asarray(center, dtype=float)
    m[:3, 3] = np.asarray(t.GetTranslation()) + c - m[:3, :3] @ c
    return m


def _three(value: Any, name: str) -> np.ndarray:
    """Three finite numbers, or InvalidInputError naming the argument."""
    try:
        v = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        v = None
    if v is None or v.shape != (3,) or not np.all(np.isfinite(v)):
        raise InvalidInputError(f"{name} must be three finite numbers (x, y, z)", fix=f"pass e.g. {name}=(0, 0, 0)")
    return v


def _euler(rotation_deg: Sequence[float], translation_mm: Sequence[float], center: Sequence[float]):
    import SimpleITK as sitk

    rx, ry, rz = (np.deg2rad(float(a)) for a in rotation_deg)
    t = sitk.Euler3DTransform()
    t.SetCenter(tuple(float(c) for c in center))
    t.SetRotation(rx, ry, rz)
    t.SetTranslation(tuple(float(v) for v in translation_mm))
    return t


def _misalign_spec(value: Any, name: str) -> np.ndarray:
    """Turn a misalignment override into a 4×4 rigid matrix."""
    if value is None or value is False:
        return np.eye(4)
    if isinstance(value, Mapping):
        unknown = set(value) - {"rotation_deg", "translation_mm"}
        if unknown:
            raise InvalidInputError(
                f"misalign[{name!r}] has unknown key(s) {sorted(unknown)}",
                fix="give {'rotation_deg': (rx, ry, rz), 'translation_mm': (tx, ty, tz)} or a 4x4 matrix",
            )
        return rigid_matrix(value.get("rotation_deg", (0, 0, 0)), value.get("translation_mm", (0, 0, 0)))
    try:  # a str or an object failed inside NumPy with its bare error
        m = np.asarray(value, dtype=float) if not np.iscomplexobj(value) else None
    except (TypeError, ValueError):
        m = None
    if m is None or m.shape != (4, 4) or not np.all(np.isfinite(m)) or not np.allclose(m[3], [0, 0, 0, 1]):
        raise InvalidInputError(f"misalign[{name!r}] is not a finite homogeneous 4x4 matrix",
                                fix="pass a 4x4 LPS matrix mapping MR points to the moving image's points")
    r = m[:3, :3]
    if not (np.allclose(r.T @ r, np.eye(3), atol=1e-6) and np.linalg.det(r) > 0):
        raise InvalidInputError(f"misalign[{name!r}] is not rigid (rotation + translation)",
                                fix="pass a proper rotation matrix in the upper-left 3x3")
    return m


# ----------------------------------------------------------------------------- phantom
@dataclass(eq=False)
class Phantom:
    """A synthetic subject: volumes, tissue labels and the registration ground truth.

    Attributes:
        ct, t1, t2, pet, spect: the images (:class:`~medfuse.volume.Volume`).
        labels: tissue labels on the MR grid (codes in :data:`LABELS`).
        transforms: ``{"pet": M, "spect": M}``, 4×4 LPS, MR point -> PET/SPECT point (ITK fixed->moving).
        lesion_center: lesion centre in MR-space LPS mm, or ``None`` without a lesion.
        lesion_radius_mm: lesion radius (0 without a lesion).
        seed: the subject seed.
        pet_patient: the PET header facts the samples' DICOM carries (weight, dose, half-life; :data:`PET_PATIENT`).
    """

    ct: Volume
    t1: Volume
    t2: Volume
    pet: Volume
    spect: Volume
    labels: Volume
    transforms: Dict[str, np.ndarray]
    lesion_center: Optional[np.ndarray]
    lesion_radius_mm: float
    seed: int
    pet_patient: Dict[str, Any] = field(default_factory=lambda: dict(PET_PATIENT))

    @property
    def volumes(self) -> Dict[str, Volume]:
        """``{"ct", "t1", "t2", "pet", "spect"}`` -> Volume."""
        return {"ct": self.ct, "t1": self.t1, "t2": self.t2, "pet": self.pet, "spect": self.spect}

    def ground_truth(self) -> Dict[str, Any]:
        """JSON-safe ground truth (what ``ground_truth.json`` holds)."""
        return {
            "convention": ("4x4 LPS matrices mapping MR-space physical points (mm) to the named image's "
                           "physical points: ITK fixed->moving with MR fixed"),
            "seed": int(self.seed),
            "mr_to_pet": np.round(self.transforms["pet"], 12).tolist(),
            "mr_to_spect": np.round(self.transforms["spect"], 12).tolist(),
            "mr_to_ct": np.eye(4).tolist(),
            "lesion": None if self.lesion_center is None else {
                "center_lps_mm": [round(float(v), 6) for v in self.lesion_center],
                "radius_mm": float(self.lesion_radius_mm),
                "space": "MR",
            },
            "pet": {"unit": "SUVbw", **self.pet_patient},
            "tissue_values": {
                "ct_hu": _named(_CT_HU), "pet_suvbw": _named(_PET_SUV), "spect_counts": _named(_SPECT),
                "t1": _named(_T1), "t2": _named(_T2),
            },
        }


def _named(table: np.ndarray) -> Dict[str, float]:
    return {name: float(table[code]) for name, code in LABELS.items()}


def lesion_contrast(array: np.ndarray, affine: np.ndarray, centre, radius_mm: float) -> float:
    """How well a volume shows the phantom lesion: mean over its core minus mean over a shell around it.

    Core: within 0.6 radius of ``centre``; shell: 1.5 to 2.5 radii. Positive means the lesion is brighter
    than its surroundings (a PET hot spot that shows); the grid is any, through ``affine`` (LPS mm).

    Args:
        array: the volume's voxels (a slab of a few slices works, with its own affine).
        affine: 4×4 index-to-LPS matrix of ``array``.
        centre: lesion centre, LPS mm, in the space of ``affine``. ``Phantom.lesion_center`` is in MR space: for
            the phantom's PET or SPECT map it first, ``(phantom.transforms["pet"] @ [*centre, 1])[:3]`` (they are
            misaligned on purpose; on the MR grid it measured the wrong place, -0.25 SUV).
        radius_mm: lesion radius (``Phantom.lesion_radius_mm``).

    Returns:
        Mean over the core minus mean over the shell, in the volume's unit.

    Raises:
        InvalidInputError: a Volume given with an affine other than its own, an affine that is not a finite 4×4
            matrix, a centre that is not three finite numbers, a radius that is not a finite positive number
            (bool, NaN and infinity included), an array that is not a 3-D real numeric one, or a lesion core or
            shell that holds no voxel of the array (a lesion outside it, or a radius far from the voxel size).
    """
    aff = _real_array(affine, "affine", fix="pass the volume's affine (vol.affine)")
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise InvalidInputError("affine must be a finite 4x4 matrix", fix="pass the volume's affine (vol.affine)")
    if isinstance(array, Volume) and not np.allclose(array.affine, aff, rtol=0, atol=1e-9):
        # NumPy reads a Volume as its voxels: another affine would measure the lesion somewhere else, silently.
        raise InvalidInputError("the Volume's own affine differs from the affine given",
                                fix="pass vol.affine with the Volume, or its voxels (vol.array) with their affine")
    # The checked float is used below (a 0-d array or a NumPy scalar stays no longer what the masks compare with).
    radius_mm = number(radius_mm, "radius_mm", low=0, open_low=True, example="radius_mm=phantom.lesion_radius_mm")
    centre = _three(centre, "centre")
    arr = _real_array(array, "array", fix="pass the volume's voxels (vol.array)")
    if arr.ndim != 3:
        raise InvalidInputError(f"array must be 3-D, got {arr.ndim}-D", fix="pass the volume's voxels (vol.array)")
    idx = np.indices(arr.shape).reshape(3, -1).T
    d = np.linalg.norm(idx @ aff[:3, :3].T + aff[:3, 3] - np.asarray(centre, float), axis=1).reshape(arr.shape)
    core, shell = d < 0.6 * radius_mm, (d > 1.5 * radius_mm) & (d < 2.5 * radius_mm)
    for name, region in (("core (within 0.6 radius)", core), ("shell (1.5 to 2.5 radii)", shell)):
        if not region.any():  # the mean of nothing was a silent NaN (with NumPy's "Mean of empty slice")
            raise InvalidInputError(
                f"the lesion's {name} holds no voxel of the array (radius {radius_mm:g} mm)",
                fix="pass the lesion's centre in LPS mm inside the array (phantom.lesion_center), its radius "
                    "(phantom.lesion_radius_mm), and the array's own affine")
    return float(arr[core].mean() - arr[shell].mean())


def _real_array(value: Any, name: str, *, fix: str) -> np.ndarray:
    """``value`` as a float64 array, or InvalidInputError: a str, a dict or an object failed inside NumPy, and
    complex values lost their imaginary part with only a ComplexWarning."""
    try:
        ok = not isinstance(value, (str, bytes)) and not np.iscomplexobj(value)
        a = np.asarray(value, dtype=float) if ok else None
    except (TypeError, ValueError):
        a = None
    if a is None:
        from ._checks import describe

        raise InvalidInputError(f"{name} must be a real numeric array, got {describe(value)}", fix=fix)
    return a


def make_phantom(*, seed: int = 0, lesion: bool = True, misalign: Optional[Mapping[str, Any]] = None,
                 noise: bool = True) -> Phantom:
    """Build the synthetic head phantom.

    Args:
        seed: subject seed. ``0`` is the canonical subject (the bundled samples); other seeds vary head
            size, ventricle size, folding and the lesion position a little.
        lesion: include the tumour (``False`` gives a lesion-free subject).
        misalign: override the PET/SPECT misalignment: ``{"pet": ..., "spect": ...}`` where each value is a
            4×4 rigid LPS matrix (MR point -> image point), ``{"rotation_deg": (rx, ry, rz),
            "translation_mm": (tx, ty, tz)}`` or ``None`` for no misalignment. Missing keys keep the default.
        noise: add image noise (MR Gaussian, CT Gaussian, PET/SPECT Poisson-like).

    Returns:
        A :class:`Phantom`. Equal arguments always give identical voxels.

    Raises:
        InvalidInputError: a seed that is not a non-negative whole number, ``lesion`` or ``noise`` not True or
            False, a ``misalign`` that is not a dict of rigid matrices or rotation/translation dicts.
    """
    from .io import _check_flag

    whole(seed, "seed", minimum=0, example="seed=0")
    lesion, noise = _check_flag(lesion, "lesion"), _check_flag(noise, "noise")  # lesion="no" is true in Python
    if misalign is not None and not isinstance(misalign, Mapping):
        raise InvalidInputError("misalign must be a dict with keys 'pet' and/or 'spect'",
                                fix="e.g. misalign={'pet': None} for an aligned PET")
    if misalign is not None and set(misalign) - {"pet", "spect"}:
        raise InvalidInputError(f"misalign has unknown key(s) {sorted(set(misalign) - {'pet', 'spect'})}",
                                fix="use the keys 'pet' and 'spect'")
    mats = {}
    for name in ("pet", "spect"):
        spec = _DEFAULT_MISALIGN[name] if misalign is None or name not in misalign else misalign[name]
        mats[name] = _misalign_spec(spec, name)
    key = (int(seed), bool(lesion), bool(noise), mats["pet"].tobytes(), mats["spect"].tobytes())
    return copy.deepcopy(_build_cached(*key))


@functools.lru_cache(maxsize=4)
def _build_cached(seed: int, lesion: bool, noise: bool, pet_bytes: bytes, spect_bytes: bytes) -> Phantom:
    mats = {"pet": np.frombuffer(pet_bytes).reshape(4, 4).copy(),
            "spect": np.frombuffer(spect_bytes).reshape(4, 4).copy()}
    return _build(seed, lesion, noise, mats)


def _mr_affine() -> np.ndarray:
    aff = np.diag([_MR_SPACING] * 3 + [1.0])
    aff[:3, 3] = -(np.asarray(_MR_SHAPE) - 1) / 2.0 * _MR_SPACING
    return aff


def _grid_affine(shape: Sequence[int], spacing: float) -> np.ndarray:
    aff = np.diag([spacing] * 3 + [1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * spacing
    return aff


class _Anatomy:
    """Subject parameters drawn from the seed (seed 0 = canonical, no variation)."""

    def __init__(self, seed: int, lesion: bool):
        rng = np.random.default_rng(seed)
        var = 0.0 if seed == 0 else 1.0
        scale = 1.0 + var * rng.uniform(-0.04, 0.04, size=3)
        self.skin = np.array([70.0, 88.0, 75.0]) * scale
        self.center = np.array([0.0, 0.0, 0.0])
        self.vent_scale = 1.0 + var * rng.uniform(-0.2, 0.25)
        jitter = var * rng.uniform(-6.0, 6.0, size=3)
        # Left frontal-parietal white matter (LPS: +x is patient left, -y anterior, +z superior).
        self.lesion_center = (np.array([27.0, -14.0, 24.0]) + jitter) if lesion else None
        self.lesion_radius = 6.0 if lesion else 0.0
        self.core_radius = 3.0
        self.fold_seed = int(rng.integers(0, 2**31 - 1)) if seed else 12345
        self.noise_seed = 1000 + seed


def _smooth_noise(shape: Sequence[int], *, seed: int, cell: float) -> np.ndarray:
    """Unit-variance smooth random field with correlation length ~``cell`` voxels (float32).

    Random values on a coarse lattice (one per ``cell`` voxels) are spread with separable Gaussian
    kernels, written as small matrix products: smooth everywhere and much faster than ``ndimage.zoom``.
    """
    rng = np.random.default_rng(seed)
    coarse_shape = [int(np.ceil(s / cell)) + 3 for s in shape]
    out = rng.standard_normal(coarse_shape).astype(np.float32)
    for axis, n in enumerate(shape):
        x_out = np.arange(n, dtype=np.float32)
        x_in = (np.arange(coarse_shape[axis], dtype=np.float32) - 1.5) * cell
        w = np.exp(-0.5 * ((x_out[:, None] - x_in[None, :]) / (0.6 * cell)) ** 2)
        w /= np.sqrt((w ** 2).sum(axis=1, keepdims=True))  # keep unit variance along the axis
        out = np.moveaxis(np.tensordot(w.astype(np.float32), np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
    return np.ascontiguousarray(out, dtype=np.float32)


def _ellipsoid_r2(axes_xyz, center, semi, rot_z_deg: float = 0.0) -> np.ndarray:
    """Squared normalised radius of an ellipsoid, evaluated on a broadcast grid."""
    x, y, z = (a - c for a, c in zip(axes_xyz, center))
    if rot_z_deg:
        t = np.deg2rad(rot_z_deg)
        x, y = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
    return (x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2


def _ellipsoid_depth(axes_xyz, center, semi) -> np.ndarray:
    """Approximate signed distance (mm) inside an ellipsoid (positive inside): -f/|grad f|."""
    x, y, z = (a - c for a, c in zip(axes_xyz, center))
    f = (x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2 - 1.0
    g = 2.0 * np.sqrt((x / semi[0] ** 2) ** 2 + (y / semi[1] ** 2) ** 2 + (z / semi[2] ** 2) ** 2) + 1e-6
    return (-f / g).astype(np.float32)


def _labels(anat: _Anatomy) -> np.ndarray:
    """Tissue labels on the MR grid."""
    aff = _mr_affine()
    xs = [(aff[a, a] * np.arange(_MR_SHAPE[a]) + aff[a, 3]).astype(np.float32) for a in range(3)]
    ax = (xs[0][:, None, None], xs[1][None, :, None], xs[2][None, None, :])
    c = anat.center
    lab = np.zeros(_MR_SHAPE, dtype=np.uint8)
    lab[_ellipsoid_r2(ax, c, anat.skin) <= 1] = LABELS["scalp"]
    lab[_ellipsoid_r2(ax, c, anat.skin - 5.0) <= 1] = LABELS["bone"]
    inner = _ellipsoid_r2(ax, c, anat.skin - 12.0) <= 1
    lab[inner] = LABELS["csf"]

    # Cortex: depth below a folded brain surface; GM ribbon ~3 mm, WM below.
    brain_semi = anat.skin - 14.5
    depth = _ellipsoid_depth(ax, c, brain_semi)
    depth = np.broadcast_to(depth, _MR_SHAPE)
    # Interhemispheric fissure: the medial surface is a second cortical surface above the corpus callosum.
    x = np.broadcast_to(ax[0], _MR_SHAPE)
    z = np.broadcast_to(ax[2], _MR_SHAPE)
    medial = np.where((depth < 38.0) & (z > -30.0), np.abs(x - c[0]) - 1.0, np.inf).astype(np.float32)
    surface = np.minimum(depth, medial)
    # Sulci follow the zero-crossings of a smooth random field: a thin CSF sheet reaching ~14 mm deep,
    # lined on both sides by grey matter, plus a ~3 mm cortical ribbon along every brain surface.
    fold = np.abs(_smooth_noise(_MR_SHAPE, seed=anat.fold_seed, cell=5.0))
    in_brain = inner & (surface > 0) & ~((fold < 0.12) & (surface < 14.0))
    lab[in_brain] = LABELS["grey_matter"]
    lab[in_brain & (surface > 3.0) & ~((fold < 0.55) & (surface < 17.0))] = LABELS["white_matter"]

    vs = anat.vent_scale
    for side in (-1.0, 1.0):
        # Caudate head, lentiform nucleus, thalamus.
        for ctr, semi, rot in (((11.0, -12.0, 12.0), (5.0, 8.0, 7.0), 0.0),
                               ((23.0, -4.0, 2.0), (6.0, 14.0, 9.0), -15.0),
                               ((10.0, 14.0, 4.0), (8.0, 12.0, 8.0), 0.0)):
            ctr_s = (c[0] + side * ctr[0], c[1] + ctr[1], c[2] + ctr[2])
            lab[in_brain & (_ellipsoid_r2(ax, ctr_s, semi, side * rot) <= 1)] = LABELS["deep_grey"]
        # Lateral ventricle body, slightly divergent posteriorly.
        ctr_v = (c[0] + side * 8.0, c[1] + 4.0, c[2] + 16.0)
        lab[in_brain & (_ellipsoid_r2(ax, ctr_v, (4.5 * vs, 24.0, 8.0 * vs), side * -10.0) <= 1)] = LABELS["ventricle"]
    # Third ventricle.
    lab[in_brain & (_ellipsoid_r2(ax, (c[0], c[1] + 10.0, c[2] + 2.0), (1.5 * vs, 10.0, 7.0)) <= 1)] = LABELS["ventricle"]

    if anat.lesion_center is not None:
        r2 = _ellipsoid_r2(ax, anat.lesion_center, (anat.lesion_radius,) * 3)
        lab[r2 <= 1] = LABELS["lesion_rim"]
        lab[r2 <= (anat.core_radius / anat.lesion_radius) ** 2] = LABELS["lesion_core"]
    return lab


def _block_mean(a: np.ndarray, f: int, axes=(0, 1, 2)) -> np.ndarray:
    shape = list(a.shape)
    new = []
    for ax_i, s in enumerate(shape):
        if ax_i in axes:
            new += [s // f, f]
        else:
            new += [s, 1]
    return a.reshape(new).mean(axis=tuple(2 * i + 1 for i in range(3)))


def _resample_rigid(src: np.ndarray, src_aff: np.ndarray, mr_to_target: np.ndarray, shape, aff_out) -> np.ndarray:
    """Sample ``src`` (on a grid in MR space) onto a target grid whose world is MR mapped by ``mr_to_target``."""
    from scipy import ndimage

    # target voxel -> target world -> MR world (inverse of the ground truth) -> src voxel
    m = np.linalg.inv(src_aff) @ np.linalg.inv(mr_to_target) @ aff_out
    return ndimage.affine_transform(src, m[:3, :3], offset=m[:3, 3], output_shape=tuple(shape), order=1,
                                    mode="constant", cval=0.0)


def _build(seed: int, lesion: bool, noise: bool, mats: Dict[str, np.ndarray]) -> Phantom:
    from scipy import ndimage

    anat = _Anatomy(seed, lesion)
    lab = _labels(anat)
    mr_aff = _mr_affine()
    rng = np.random.default_rng(anat.noise_seed)
    in_head = lab > 0

    # Smooth tissue texture and a gentle bias field make the MR look less like a cartoon.
    texture = _smooth_noise(_MR_SHAPE, seed=anat.noise_seed + 1, cell=3.0)
    bias = 1.0 + 0.04 * _smooth_noise(_MR_SHAPE, seed=anat.noise_seed + 2, cell=40.0)
    mr = {}
    for name, table in (("t1", _T1), ("t2", _T2)):
        img = table[lab] * (1.0 + 0.02 * texture)
        img = ndimage.gaussian_filter(img, 0.6) * bias  # partial volume at edges
        if noise:
            img = img + rng.normal(0.0, 8.0, size=img.shape).astype(np.float32) * in_head
        img = np.clip(np.rint(img), 0, 32767).astype(np.int16)
        img[~in_head & (img < 20)] = 0
        mr[name] = Volume(img, mr_aff, modality="MR", unit="arbitrary",
                          provenance={"reader": "medfuse.phantom", "series_description": f"phantom {name.upper()}"})

    # CT: average 4 MR slices into one 4 mm slice (thick-slice partial volume), then round to HU.
    hu = _CT_HU[lab] + np.where(lab == LABELS["bone"], 150.0 * texture, 0.0).astype(np.float32)
    hu = _block_mean(hu, _CT_SLAB, axes=(2,))
    if noise:
        hu = hu + rng.normal(0.0, 4.0, size=hu.shape) * (hu > -900)
    ct_arr = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    ct_aff = mr_aff.copy()
    ct_aff[2, 2] = _MR_SPACING * _CT_SLAB
    ct_aff[2, 3] = mr_aff[2, 3] + (_CT_SLAB - 1) / 2.0 * _MR_SPACING
    ct = Volume(ct_arr, ct_aff, modality="CT", unit="HU",
                provenance={"reader": "medfuse.phantom", "series_description": "phantom CT head"})

    # PET / SPECT: activity at 2 mm, blurred to the system FWHM, moved by the ground truth, Poisson-like noise.
    def emission(table, spacing, shape, fwhm, mat, counts_per_unit):
        act = _block_mean(table[lab], 2)
        act_aff = mr_aff.copy()
        act_aff[:3, :3] *= 2
        act_aff[:3, 3] += 0.5 * _MR_SPACING
        act = ndimage.gaussian_filter(act, fwhm / 2.3548 / 2.0, truncate=3.0)
        aff_out = _grid_affine(shape, spacing)
        out = _resample_rigid(act, act_aff, mat, shape, aff_out)
        out = np.clip(out, 0.0, None)
        if noise:
            out = rng.poisson(out * counts_per_unit).astype(np.float32) / counts_per_unit
        return out.astype(np.float32), aff_out

    pet_arr, pet_aff = emission(_PET_SUV, _PET_SPACING, _PET_SHAPE, _PET_FWHM, mats["pet"], 20.0)
    pet = Volume(pet_arr, pet_aff, modality="PT", unit="SUVbw",
                 provenance={"reader": "medfuse.phantom", "series_description": "phantom FDG PET"})
    sp_arr, sp_aff = emission(_SPECT, _SPECT_SPACING, _SPECT_SHAPE, _SPECT_FWHM, mats["spect"], 1.0)
    spect = Volume(sp_arr, sp_aff, modality="NM", unit="counts",
                   provenance={"reader": "medfuse.phantom", "series_description": "phantom perfusion SPECT"})
    labels = Volume(lab, mr_aff, modality="MR", unit="arbitrary", provenance={"reader": "medfuse.phantom"})
    return Phantom(ct=ct, t1=mr["t1"], t2=mr["t2"], pet=pet, spect=spect, labels=labels,
                   transforms={k: v.copy() for k, v in mats.items()},
                   lesion_center=None if anat.lesion_center is None else anat.lesion_center.copy(),
                   lesion_radius_mm=float(anat.lesion_radius), seed=int(seed))


# ----------------------------------------------------------------------------- sample files
_PET_TIMES = {"study_date": "20260101", "injection_time": "100000.000000", "series_time": "110000.000000"}
_PET_UPTAKE_S = 3600.0  # series start - injection


def _pet_bqml_factor() -> float:
    """SUVbw -> Bq/mL for the sample PET: decayed dose (DecayCorrection START) over body weight in g."""
    decayed = PET_PATIENT["injected_dose_bq"] * 2.0 ** (-_PET_UPTAKE_S / PET_PATIENT["half_life_s"])
    return decayed / (PET_PATIENT["patient_weight_kg"] * 1000.0)


def _pet_template():
    """A pydicom Dataset with the tags a reader needs to turn Bq/mL back into SUVbw."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Modality = "PT"
    ds.PatientWeight = str(PET_PATIENT["patient_weight_kg"])
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = _PET_TIMES["study_date"]
    ds.SeriesTime = ds.AcquisitionTime = _PET_TIMES["series_time"]
    ds.Units = "BQML"
    ds.DecayCorrection = "START"
    ds.CorrectedImage = ["ATTN", "DECY"]
    rp = Dataset()
    rp.Radiopharmaceutical = PET_PATIENT["radiopharmaceutical"]
    rp.RadiopharmaceuticalStartTime = _PET_TIMES["injection_time"]
    rp.RadiopharmaceuticalStartDateTime = _PET_TIMES["study_date"] + _PET_TIMES["injection_time"]
    rp.RadionuclideTotalDose = str(PET_PATIENT["injected_dose_bq"])
    rp.RadionuclideHalfLife = str(PET_PATIENT["half_life_s"])
    ds.RadiopharmaceuticalInformationSequence = [rp]
    return ds


def default_samples_folder() -> Optional[Path]:
    """The bundled ``sample_volumes`` folder: ``$MEDFUSE_SAMPLES``, else the repository's copy, else ``None``."""
    env = os.environ.get("MEDFUSE_SAMPLES")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1] / "sample_volumes"
    return here if (here / "ground_truth.json").is_file() else None


def _atomic_write_text(path: Path, text: str, *, overwrite: bool) -> None:
    from .io._atomic import atomic_write_text

    atomic_write_text(path, text, overwrite=overwrite)


def _write_tfm(matrix: np.ndarray, path: Path, *, overwrite: bool) -> None:
    """Write a rigid 4×4 (MR point -> image point) as an ITK Euler3DTransform ``.tfm``, atomically."""
    import SimpleITK as sitk

    from .io._atomic import atomic_path
    from .io.nifti import itk_path

    t = sitk.Euler3DTransform()
    t.SetMatrix(tuple(float(v) for v in matrix[:3, :3].ravel()))
    t.SetTranslation(tuple(float(v) for v in matrix[:3, 3]))
    with atomic_path(path, overwrite=overwrite) as tmp:
        sitk.WriteTransform(t, itk_path(tmp, writing=True))


def write_samples(folder: Union[str, os.PathLike], *, overwrite: bool = False, seed: int = 0) -> Dict[str, Path]:
    """Write the sample volumes (CT and PET as DICOM series, MR and SPECT as NIfTI) and the ground truth.

    Args:
        folder: output folder (created if needed).
        overwrite: replace existing files; without it an existing file raises :class:`OutputExistsError`
            before anything is written.
        seed: subject seed (0 = the bundled canonical subject).

    Returns:
        ``{name: path}`` of everything written.

    Raises:
        InvalidInputError: ``folder`` is not a path or is a file, or ``seed`` is not a non-negative whole number.
        OutputExistsError: sample files exist (without ``overwrite``).
        OutputWriteError: the folder cannot be made or written (its ``errno`` says why).
    """
    from .io import _as_path, _check_flag, save

    out = _as_path(folder, what="folder", fix="pass the output folder as a str or pathlib.Path")
    overwrite = _check_flag(overwrite, "overwrite")
    whole(seed, "seed", minimum=0, example="seed=0")  # before the folder is made
    targets = {**{k: out / v for k, v in SAMPLE_FILES.items()},
               "ground_truth": out / "ground_truth.json", "pet_tfm": out / "pet_to_mr.tfm",
               "spect_tfm": out / "spect_to_mr.tfm", "readme": out / "README.md"}
    if not overwrite:
        existing = [p for p in targets.values() if p.exists()]
        if existing:
            raise OutputExistsError(
                f"{len(existing)} sample file(s) exist already (e.g. {existing[0].name})",
                fix="pass overwrite=True (CLI: --overwrite) to regenerate them", path=out,
            )
    if out.exists() and not out.is_dir():
        raise InvalidInputError("the output path exists and is not a folder", fix="choose a folder", path=out)
    from .io._atomic import make_folder

    make_folder(out, problem="cannot make the samples' folder")  # a typed error: read-only, no permission...
    ph = make_phantom(seed=seed)

    save(ph.ct, targets["ct"], overwrite=overwrite, format="dicom", series_description="phantom CT head")
    pet_bq = ph.pet.with_array(ph.pet.array * np.float32(_pet_bqml_factor()), unit="Bq/mL")
    save(pet_bq, targets["pet"], overwrite=overwrite, format="dicom", series_description="phantom FDG PET",
         template=_pet_template())
    save(ph.t1, targets["t1"], overwrite=overwrite)
    save(ph.t2, targets["t2"], overwrite=overwrite)
    save(ph.spect, targets["spect"], overwrite=overwrite)

    gt = ph.ground_truth()
    gt["pet"].update({"bqml_per_suvbw": _pet_bqml_factor(), "uptake_time_s": _PET_UPTAKE_S,
                      "decay_correction": "START"})
    gt["files"] = {k: os.path.relpath(v, out) for k, v in targets.items()}
    gt["regenerate"] = _regenerate(seed)
    _atomic_write_text(targets["ground_truth"], json.dumps(gt, indent=2) + "\n", overwrite=overwrite)
    _write_tfm(ph.transforms["pet"], targets["pet_tfm"], overwrite=overwrite)
    _write_tfm(ph.transforms["spect"], targets["spect_tfm"], overwrite=overwrite)
    _atomic_write_text(targets["readme"], _readme(seed), overwrite=overwrite)
    return targets


def _regenerate(seed: int) -> str:
    """The command that writes these samples again: with ``--seed`` unless it is the bundled subject's 0.

    Why: samples of another seed said "seed 0" and named a command that wrote other voxels.
    """
    return "python -m medfuse.phantom --write sample_volumes --overwrite" + (f" --seed {int(seed)}" if seed else "")


def _readme(seed: int) -> str:
    """The samples' README for subject ``seed`` (seed 0: the bundled README, byte for byte)."""
    command = _regenerate(seed) + ("      # or: make samples" if not seed else "")
    return _README.replace("<SEED>", str(int(seed))).replace("<REGENERATE>", command)


def load_samples(folder: Optional[Union[str, os.PathLike]] = None) -> Dict[str, Volume]:
    """Load the sample volumes: ``{"ct", "t1", "t2", "pet", "spect"}`` -> Volume.

    Args:
        folder: a folder written by :func:`write_samples`. Default: ``$MEDFUSE_SAMPLES`` or the repository's
            ``sample_volumes``; when neither exists (an installed package), the phantom is built in memory.

    Returns:
        ``{"ct", "t1", "t2", "pet", "spect"}`` -> :class:`~medfuse.volume.Volume` (PET in SUVbw).

    Raises:
        InvalidInputError: ``folder`` is not a path.
        UnreadableFileError: the folder holds no ``ground_truth.json``, or a sample cannot be read.
    """
    from .io import _as_path, load

    if folder is None:
        folder = default_samples_folder()
        if folder is None:
            return make_phantom().volumes
    f = _as_path(folder, what="folder", fix="pass a folder written by write_samples, or leave it out")
    if not (f / "ground_truth.json").is_file():
        raise UnreadableFileError("this is not a sample-volumes folder (no ground_truth.json)",
                                  fix="regenerate it: python -m medfuse.phantom --write DIR --overwrite", path=f)
    return {
        "ct": load(f / SAMPLE_FILES["ct"]),
        "t1": load(f / SAMPLE_FILES["t1"], modality="MR", unit="arbitrary"),
        "t2": load(f / SAMPLE_FILES["t2"], modality="MR", unit="arbitrary"),
        "pet": load(f / SAMPLE_FILES["pet"]),
        "spect": load(f / SAMPLE_FILES["spect"], modality="NM", unit="counts"),
    }


def load_ground_truth(folder: Optional[Union[str, os.PathLike]] = None) -> Dict[str, Any]:
    """The ground truth of the samples (``ground_truth.json``), matrices as 4×4 ``numpy`` arrays.

    Keys: ``mr_to_pet``, ``mr_to_spect``, ``mr_to_ct`` (4×4 LPS, MR point -> image point), ``lesion``
    (``center_lps_mm``, ``radius_mm``) and ``pet`` (weight, dose, half-life). Without a folder and without
    bundled files, it is computed from :func:`make_phantom`.

    Args:
        folder: a folder written by :func:`write_samples`; default as :func:`load_samples`.

    Returns:
        The ground truth as a dict, matrices and the lesion centre as ``numpy`` arrays.

    Raises:
        InvalidInputError: ``folder`` is not a path.
        UnreadableFileError: no ``ground_truth.json`` there, or it is not valid JSON.
    """
    from .io import _as_path

    if folder is None:
        folder = default_samples_folder()
        if folder is None:
            gt = make_phantom().ground_truth()
            return _gt_arrays(gt)
    folder = _as_path(folder, what="folder", fix="pass a folder written by write_samples, or leave it out")
    path = Path(folder) / "ground_truth.json"
    if not path.is_file():
        raise UnreadableFileError("no ground_truth.json here",
                                  fix="regenerate the samples: python -m medfuse.phantom --write DIR --overwrite",
                                  path=Path(folder))
    try:
        gt = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UnreadableFileError(f"ground_truth.json is not valid JSON ({e.__class__.__name__})",
                                  fix="regenerate the samples: python -m medfuse.phantom --write DIR --overwrite",
                                  path=path) from None
    return _gt_arrays(gt)


def _gt_arrays(gt: Dict[str, Any]) -> Dict[str, Any]:
    for k in ("mr_to_pet", "mr_to_spect", "mr_to_ct"):
        gt[k] = np.asarray(gt[k], dtype=float)
    if gt.get("lesion"):
        gt["lesion"]["center_lps_mm"] = np.asarray(gt["lesion"]["center_lps_mm"], dtype=float)
    return gt


_README = """\
# Sample volumes (synthetic, no patient data)

Generated by `medfuse.phantom` from one deterministic synthetic head (seed <SEED>). Regenerate with

    <REGENERATE>

Writing twice gives the same voxels (DICOM UIDs are new each time).

| file | what | grid |
|---|---|---|
| `ct/` | CT head, DICOM series, HU (int16) | 160x192x40, 1x1x4 mm, same frame as the MR |
| `pet/` | FDG PET, DICOM series, stored in Bq/mL with the radiopharmaceutical tags (weight 70 kg, 250 MBq 18F, 60 min uptake, DecayCorrection START) so that `medfuse.load` gives SUVbw | 64x76x64, 3 mm, 6 mm FWHM, Poisson-like noise |
| `mr_t1.nii.gz`, `mr_t2.nii.gz` | MR T1- and T2-like contrasts, arbitrary units (int16) | 160x192x160, 1 mm |
| `spect.nii.gz` | perfusion SPECT, counts (float32) | 44x52x44, 4.5 mm, 10 mm FWHM |
| `ground_truth.json` | misalignments, lesion, PET dose facts, nominal tissue values | |
| `pet_to_mr.tfm`, `spect_to_mr.tfm` | the same misalignments as ITK Euler3D transforms (SimpleITK `ReadTransform`) | |

All world coordinates are LPS mm (DICOM/ITK); the NIfTI files store the equivalent RAS affine.

**Ground truth.** `mr_to_pet` / `mr_to_spect` are 4x4 matrices mapping a physical point of the MR
(and CT) space to the physical point of the PET/SPECT where the same anatomy sits: the ITK
"fixed -> moving" convention. A rigid registration of the PET (moving) onto the MR (fixed) should
return exactly this matrix; the `.tfm` files hold it for other tools (named after that registration,
PET onto MR). `mr_to_ct` is the identity.

**Anatomy.** Scalp, skull, CSF, cortex ribbon with sulci, white matter, deep grey nuclei, lateral
and third ventricles, and a 12 mm tumour (hot 3 mm core, rim) in the left hemisphere, centre in
`ground_truth.json` (`lesion.center_lps_mm`, MR space). Nominal PET uptake: grey matter 8, white
matter 3, lesion 16-20 SUVbw before the 6 mm blur (the blurred peak is about 14).
"""


# ----------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m medfuse.phantom --write DIR [--overwrite] [--seed N]``.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 written, 2 refused (the message is printed on stderr).

    Raises:
        SystemExit: ``--help``, or arguments argparse refuses (exit code 2).
    """
    parser = argparse.ArgumentParser(prog="python -m medfuse.phantom",
                                     description="Write the synthetic head phantom's sample volumes.")
    parser.add_argument("--write", metavar="DIR", required=True, help="output folder (e.g. sample_volumes)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing sample files")
    parser.add_argument("--seed", type=int, default=0, help="subject seed (0 = the bundled subject)")
    args = parser.parse_args(argv)
    try:
        written = write_samples(args.write, overwrite=args.overwrite, seed=args.seed)
    except MedfuseError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        return 2
    total = sum(p.stat().st_size for w in written.values() for p in ([w] if w.is_file() else w.rglob("*")) if p.is_file())
    print(f"wrote {len(written)} sample files to {args.write} ({total / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
