"""``medfuse train``: train the fusion network and export the shipped safetensors weights.

Run ``python -m medfuse.fusion.train --help`` (or ``medfuse train``). The recipe:

* Data (a MONAI ``Dataset`` + ``Compose`` pipeline, fixed seed): the Harvard pairs (PET/SPECT pseudo-colour
  through YCbCr: the network fuses the MRI with the luma ``Y``), split **by case** into training and validation;
  2-D slices of ``brats-gli-00001`` (MR-MR, also 3-input batches) and ``spm12-templates`` (T1 with PET/SPECT/T2);
  3-D patches of the same volumes and of the synthetic phantom for the tri-plane aggregation stage.
* Loss: the fusion metrics themselves, made differentiable (:class:`MetricLoss`): ``-(Qabf + a·VIF/n) +
  b·(1 - SSIM/n)`` with the reference definitions (Sobel Xydeas-Petrović Qabf, 4-scale pixel VIF with
  sigma_n² = 2, skimage-default SSIM), on the 0..255 scale the published tables use.
* Each epoch: a validation metric table per pair type beside the max rule (stdout, ``train.log`` and
  ``metrics.csv`` in the run folder), a checkpoint (resume with ``--resume``), and a tqdm progress bar on stderr
  when it is a terminal and the environment allows the command line's bars (:func:`_epoch_bar`). CUDA with mixed
  precision (bf16 autocast) when present, the CPU otherwise.
* Your own pairs: ``--data`` pointing at a folder whose ``harvard-pairs/`` holds any of the three pair-type
  folders (:data:`LAYOUT`); 3-D volumes are not a training source of their own (slice them to PNG pairs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._checks import MAX_THREADS, user_stacklevel
from ..errors import (CancelledError, InvalidInputError, MedfuseError, MedfuseWarning, OutputExistsError,
                      UnreadableFileError, WeightsError)
from ..harvard import case_of, _png_names, split_cases, spread  # the one split: medfuse evaluate --split uses it too

__all__ = ["add_arguments", "run", "main", "harvard_pairs", "split_cases", "load_pair", "MetricLoss",
           "torch_metrics", "export_weights", "data_fingerprint", "code_version", "PAIR_TYPES", "DEFAULT_SHARED"]

PAIR_TYPES = {"CT-MRI": "CT", "PET-MRI": "PET", "SPECT-MRI": "SPECT"}
FUNCTIONAL_TYPES = ("PET-MRI", "SPECT-MRI")  # pair types whose second image is functional (uptake)
DEFAULT_SHARED = Path(__file__).resolve().parents[2].parent / "shared"
#: ``--data``'s default: the team's shared/data beside a checkout; None in an installed package, where that path
#: (``<venv>/lib/python3.x/shared/data``) is nothing the user made, and --data must be given.
DEFAULT_DATA = DEFAULT_SHARED / "data" if (Path(__file__).resolve().parents[2] / "pyproject.toml").is_file() else None
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: Layout version of the ``last.ckpt``/``best.ckpt`` files this medfuse writes; a newer one is refused by name.
CHECKPOINT_FORMAT = 1


# ============================================================================ data
#: Smallest side of a training pair in pixels: validation scores whole pairs, and the 4-scale VIF's 'valid'
#: filters (17, 9, 5, 3 taps with three halvings) need 41 (as :data:`MIN_CROP` does for the crops).
MIN_PAIR_SIZE = 41
#: The folder layout ``--data`` must hold, for error messages (the README's "Training on your own pairs").
LAYOUT = ("DATA/harvard-pairs/ with one or more of CT-MRI/{MRI,CT}/, PET-MRI/{MRI,PET}/, SPECT-MRI/{MRI,SPECT}/, "
          "each pair two same-sized PNGs (41x41 pixels or more) of the same name in the two sub-folders, named "
          "CASE then a 3-digit slice (28010.png: case 28, slice 010; the split is by case), and at least two cases "
          "per pair type")


def harvard_pairs(root: Path) -> Dict[str, List[Tuple[Path, Path]]]:
    """{pair type: [(mri path, other path), ...]} sorted by name, for the pair types ``root`` holds.

    A pair type whose folder is absent is left out (your own CT-MRI pairs alone can be trained on); one whose
    folder lacks either sub-folder is an error (a half-copied folder). An image without a partner of the same
    name is left out with a :class:`~medfuse.errors.MedfuseWarning` (it was dropped silently before, so a
    half-copied folder trained on less data than the user thought).

    Raises:
        UnreadableFileError: ``root`` is missing, holds none of the pair-type folders, or one of them lacks
            its ``MRI/`` or other sub-folder. The message gives the layout.
        InvalidInputError: an MRI image's name is not CASE + a 3-digit slice (:func:`_check_slice_names`).
    """
    root = Path(root)
    if not root.is_dir():
        # Why: pointing --data at harvard-pairs/ itself (or at CT-MRI/) is the common mistake; say so.
        up = next((d for d in (root.parent, root.parent.parent) if any((d / t).is_dir() for t in PAIR_TYPES)), None)
        fix = (f"--data points at or inside {up}; pass the folder that holds it ({up.parent})" if up is not None
               else f"pass --data DATA where the layout is {LAYOUT}"
               + (" (../shared/data is one)" if DEFAULT_DATA is not None else ""))
        raise UnreadableFileError("the Harvard pairs folder is missing", path=root, fix=fix)
    present = [t for t in PAIR_TYPES if (root / t).is_dir()]
    if not present:
        raise UnreadableFileError("the Harvard pairs folder holds no CT-MRI/, PET-MRI/ or SPECT-MRI/ folder",
                                  path=root, fix=f"pass --data DATA where the layout is {LAYOUT}")
    out = {}
    for ptype in present:
        other = PAIR_TYPES[ptype]
        d = root / ptype
        for sub in ("MRI", other):
            if not (d / sub).is_dir():
                raise UnreadableFileError(f"the {ptype} folder has no {sub}/ sub-folder", path=d,
                                          fix=f"put the pairs' MRI PNGs in {ptype}/MRI/ and the {other} PNGs of the "
                                              f"same names in {ptype}/{other}/, or remove {ptype}/ to train "
                                              "without that pair type")
        names = _png_names(d / "MRI")
        _check_slice_names(names, d / "MRI")
        others = set(_png_names(d / other))
        lone = sorted(set(names) ^ others)
        if lone:
            warnings.warn(f"{d}: {len(lone)} image(s) without a partner of the same name in MRI/ and {other}/ "
                          f"were left out (e.g. {lone[0]})", MedfuseWarning, stacklevel=2)
        out[ptype] = [(d / "MRI" / n, d / other / n) for n in names if n in others]
    return out


#: A training pair's file name without its .png: CASE (one character or more) then a 3-digit slice number.
_SLICE_NAME = re.compile(r"(.+)(\d{3})")


def _check_slice_names(names: Sequence[str], folder: Path) -> None:
    """Refuse pair names that are not CASE + a 3-digit slice (as :func:`medfuse.harvard.case_id` refuses them).

    Why: the split by case takes all but a name's last three characters as its case, so ``sub01_s0.png`` ..
    ``sub01_s16.png`` became the cases ``sub01``, ``sub01_``, ``sub01_s`` and one subject's slices landed in
    training and validation alike (the validation then scored images the network had trained on), silently.

    Raises:
        InvalidInputError: naming how many names do not fit, one of them, and how to rename them.
    """
    bad = [n for n in names if not _SLICE_NAME.fullmatch(Path(n).stem)]
    if bad:
        raise InvalidInputError(f"{len(bad)} of the {len(names)} pair names do not end in a 3-digit slice number "
                                f"after their case (e.g. {bad[0]}): the split by case takes all but a name's last "
                                "3 characters as its case, so one subject's slices would be split between "
                                "training and validation", path=folder,
                                fix="rename each pair (both images) CASE + zero-padded 3-digit slice, e.g. "
                                    "sub01_s0.png -> sub01000.png, sub01_s16.png -> sub01016.png (28010.png: case "
                                    "28, slice 010)")


def _check_split(train_pairs: Dict[str, list], val_pairs: Dict[str, list], root: Path) -> None:
    """Every pair type present needs training and validation pairs; else the sampler fails later with an
    internal error."""
    for ptype in train_pairs:
        n_train, n_val = len(train_pairs.get(ptype, [])), len(val_pairs.get(ptype, []))
        if n_train == 0 or n_val == 0:
            raise InvalidInputError(f"{ptype} has {n_train} training and {n_val} validation pairs; training needs "
                                    "both, split by case (so at least two cases of aligned MRI/other PNG pairs)",
                                    path=Path(root) / ptype,
                                    fix=f"arrange the pairs as {LAYOUT}, or remove {ptype}/ to train without it")


def read_pairs(pairs: Dict[str, list]) -> Dict[str, List[np.ndarray]]:
    """Every pair read (:func:`load_pair`): run before the run folder is made, so that a broken PNG stops the run
    before anything is written or trained (validation pairs were first read at the end of epoch 1).

    Raises:
        UnreadableFileError, InvalidInputError: as :func:`load_pair`; InvalidInputError also for a pair smaller
            than :data:`MIN_PAIR_SIZE` pixels on a side, which validation cannot score.
    """
    out = {}
    for k, v in pairs.items():
        out[k] = []
        for a, b in v:
            x = load_pair(a, b)
            if min(x.shape[1:]) < MIN_PAIR_SIZE:
                # Why before training: validation scores whole pairs, and the 4-scale VIF's filters do not fit a
                # smaller image (an internal error at the end of epoch 1).
                raise InvalidInputError(f"the pair is {x.shape[1]}x{x.shape[2]} pixels; training needs at least "
                                        f"{MIN_PAIR_SIZE}x{MIN_PAIR_SIZE} (the validation metrics' VIF filters)",
                                        path=a, fix="remove the pair, or upsample both of its images")
            out[k].append(x)
    return out


def to_luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma (the Y of YCbCr, equal to OpenCV's BGR->GRAY weights) of an RGB or grey image."""
    if rgb.ndim == 2:
        return rgb.astype(np.float32)
    rgb = rgb[..., :3].astype(np.float32)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def load_pair(a: Path, b: Path) -> np.ndarray:
    """(2, H, W) float32 in 0..1: the MRI and the luma of the other image (rounded, as the metrics do).

    Raises:
        UnreadableFileError: an image cannot be read (the message names that file).
        InvalidInputError: the two images differ in size.
    """
    from ..harvard import load_png  # palette, 16-bit and grey+alpha PNGs too; typed errors naming the file

    ia, ib = load_png(a), load_png(b)
    if ia.shape[:2] != ib.shape[:2]:
        raise InvalidInputError(f"the MRI is {ia.shape[:2]} pixels but its partner is {ib.shape[:2]}", path=b,
                                fix="both images of a pair must have the same size; remove or replace the pair")
    return np.stack([np.round(to_luma(ia)), np.round(to_luma(ib))]).astype(np.float32) / 255.0


def _norm01(v: np.ndarray) -> np.ndarray:
    v = np.nan_to_num(v.astype(np.float32))
    lo, hi = np.percentile(v, 0.5), np.percentile(v, 99.5)
    if hi <= lo:
        return np.zeros_like(v)
    return np.clip((v - lo) / (hi - lo), 0, 1)


def _load_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    return _norm01(np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32))


def volume_sets(shared: Path) -> List[np.ndarray]:
    """The 3-D sets of ``shared/data`` (the team's ``../shared`` layout); see :func:`volumes_in`."""
    return volumes_in(Path(shared) / "data")


#: The files each 3-D volume folder of ``--data`` must hold (all of them, or the folder is not used at all).
VOLUME_FILES = {"brats-gli-00001": ("t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz", "t2f.nii.gz"),
                "spm12-templates": ("T1.nii", "PET.nii", "T2.nii", "SPECT.nii")}


def check_volume_folders(data: Path) -> None:
    """Refuse a partly copied 3-D volume folder before anything is read or written.

    Why: an empty or half-copied ``brats-gli-00001/`` beside valid pairs failed in :func:`volumes_in` with an
    internal FileNotFoundError, after the run folder and its ``train.log`` were made.

    Raises:
        UnreadableFileError: a folder of :data:`VOLUME_FILES` is present and lacks one of its files (named).
    """
    for folder, names in VOLUME_FILES.items():
        d = Path(data) / folder
        if not d.is_dir():
            continue
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            what = "holds none of its files" if len(missing) == len(names) else f"lacks {', '.join(missing)}"
            raise UnreadableFileError(f"the 3-D volume folder {what} (it needs {', '.join(names)})", path=d,
                                      fix=f"copy the whole {folder}/ folder into --data, or remove it to train "
                                          "without it")


def _load_volume(path: Path) -> np.ndarray:
    """:func:`_load_nifti` with a typed error naming the file (a truncated or foreign file raised nibabel's)."""
    try:
        return _load_nifti(path)
    except Exception as exc:  # noqa: BLE001 - nibabel, gzip and numpy raise several types for a bad file
        raise UnreadableFileError(f"cannot read the 3-D training volume ({type(exc).__name__})", path=path,
                                  fix=f"copy {path.parent.name}/ again, or remove it from --data to train "
                                      "without it") from None


def volumes_in(data: Path) -> List[np.ndarray]:
    """Co-registered 3-D sets (N, D, H, W) in 0..1 from ``data`` (the ``--data`` folder, which holds
    ``brats-gli-00001/`` and ``spm12-templates/``): BraTS contrasts, SPM12 templates, the phantom.

    Raises:
        UnreadableFileError: a volume folder lacks a file (:func:`check_volume_folders`) or one is unreadable.
    """
    import scipy.ndimage as ndi

    check_volume_folders(data)
    sets = []
    br = Path(data) / "brats-gli-00001"
    if br.is_dir():
        t1n, t1c, t2w, t2f = (_load_volume(br / f"{n}.nii.gz") for n in ("t1n", "t1c", "t2w", "t2f"))
        sets += [np.stack([t1c, t2f]), np.stack([t1n, t2w]), np.stack([t1c, t2w, t2f])]
    sp = Path(data) / "spm12-templates"
    if sp.is_dir():
        t1 = _load_volume(sp / "T1.nii")
        # The templates are 2 mm; bring them to about 1 mm so their structures match the other data's scale.
        def up(v):
            return np.clip(ndi.zoom(v, 2, order=1), 0, 1).astype(np.float32)
        for other in ("PET", "T2"):
            sets.append(np.stack([up(t1), up(_load_volume(sp / f"{other}.nii"))]))
        spect = _load_volume(sp / "SPECT.nii")
        if spect.shape == t1.shape:
            sets.append(np.stack([up(t1), up(spect[::-1])]))  # SPECT is RAS voxel order, the others LAS
    try:
        from ..phantom import make_phantom

        ph = make_phantom(seed=1, misalign={"pet": None, "spect": None})
        sets.append(np.stack([_norm01(ph.t1.array), _norm01(ph.t2.array)]))
    except Exception:  # noqa: BLE001 - the phantom is optional extra data
        pass
    return sets


class _Sampler:
    """Random training batches through a MONAI Dataset/Compose pipeline (crop, flips, 90° rotations)."""

    def __init__(self, train_pairs: Dict[str, list], vols: List[np.ndarray], *, crop: int, seed: int,
                 extra_fraction: float, type_weights: Optional[Dict[str, float]] = None,
                 three_input_fraction: float = 0.0, targets: Optional[Dict[str, List[np.ndarray]]] = None,
                 hot_spot_fraction: float = 0.0, loaded: Optional[Dict[str, List[np.ndarray]]] = None):
        """``loaded``: the training pairs already read (:func:`read_pairs`); else they are read here."""
        from monai.data import Dataset
        from monai.transforms import Compose, RandFlip, RandRotate90, RandSpatialCrop, SpatialPad

        self.rng = np.random.default_rng(seed)
        self.harvard = read_pairs(train_pairs) if loaded is None else loaded
        # Teacher images per pair type, aligned with the pairs; they ride along as an extra channel so the
        # crop, flips and rotations stay the same as the inputs'. ``last_target`` is (B, H, W) or None.
        self.targets = targets or {}
        self.last_target: Optional[np.ndarray] = None
        w = np.array([(type_weights or {}).get(k, 1.0) for k in self.harvard], dtype=float)
        self.type_p = w / w.sum()
        self.vols = vols
        self.extra_fraction = extra_fraction if vols else 0.0
        self.three_input_fraction = three_input_fraction
        # Synthetic PET/SPECT hot spots (hotspots.py); ``last_spots`` is (B, H, W) or None.
        self.hot_spot_fraction = hot_spot_fraction
        self.last_spots: Optional[np.ndarray] = None
        self.crop = crop
        self.tf = Compose([SpatialPad((crop, crop)), RandSpatialCrop((crop, crop), random_size=False),
                           RandFlip(prob=0.5, spatial_axis=0), RandFlip(prob=0.5, spatial_axis=1),
                           RandRotate90(prob=0.5)])
        self.tf.set_random_state(seed=seed)
        self.Dataset = Dataset

    def _slice(self, vol: np.ndarray) -> np.ndarray:
        """A 2-D slice with content along a random axis."""
        for _ in range(20):
            axis = int(self.rng.integers(3))
            idx = int(self.rng.integers(vol.shape[1 + axis]))
            s = np.take(vol, idx, axis=1 + axis)
            if (s > 0.05).mean() > 0.15:
                return s
        return s

    def batch(self, size: int) -> np.ndarray:
        self.last_type = "extra"
        if self.rng.random() < self.extra_fraction:
            vol = self.vols[int(self.rng.integers(len(self.vols)))]
            n = vol.shape[0]
            items = [self._slice(vol) for _ in range(size)]
            items = [it if it.shape[0] == n else it for it in items]
        else:
            ptype = list(self.harvard)[int(self.rng.choice(len(self.harvard), p=self.type_p))]
            pool = self.harvard[ptype]
            self.last_type = ptype
            idx = [int(self.rng.integers(len(pool))) for _ in range(size)]
            teach = self.targets.get(ptype)
            items = [pool[i] if teach is None else np.concatenate([pool[i], teach[i][None]]) for i in idx]
        ds = self.Dataset(items, transform=self.tf)
        out = np.stack([np.asarray(ds[i]) for i in range(len(items))]).astype(np.float32)
        self.last_target = None
        if self.last_type in self.targets:
            out, self.last_target = out[:, :-1], out[:, -1]
        self.last_spots = None
        if self.hot_spot_fraction > 0 and self.last_type in FUNCTIONAL_TYPES:
            from .hotspots import add_hot_spots

            out, spots = add_hot_spots(out, self.rng, fraction=self.hot_spot_fraction, functional=1)
            self.last_spots = spots if spots.any() else None
        if self.three_input_fraction > 0 and self.last_type != "extra" \
                and self.rng.random() < self.three_input_fraction:
            out = self._split_three(out)
        if self.rng.random() < 0.5:  # the model is symmetric by design; swapping keeps it honest
            out = out[:, ::-1].copy()
        return out

    def _split_three(self, out: np.ndarray) -> np.ndarray:
        """(B, 2, H, W) -> (B, 3, H, W): one input split into two parts with (nearly) disjoint supports.

        Why: fine-tuning on 2-input pairs alone lets the 3-input behaviour drift (a part that only one of three
        inputs carries gets dropped). The two parts sum to the original input, so a fusion that keeps every
        part keeps it. The split is a smooth random mask (a steep sigmoid of upsampled noise), so it adds no
        hard step edges that the other inputs could not explain.
        """
        from scipy import ndimage as ndi

        b, _, h, w = out.shape
        which = int(self.rng.integers(2))
        res = []
        for i in range(b):
            field = ndi.zoom(self.rng.standard_normal((4, 4)), (h / 4, w / 4), order=3)[:h, :w]
            m = 1.0 / (1.0 + np.exp(-6.0 * field / (field.std() + 1e-6)))
            src = out[i, which]
            res.append(np.stack([src * m, src * (1 - m), out[i, 1 - which]]))
        return np.stack(res).astype(np.float32)


# ============================================================================ differentiable metrics
def _gauss(n: int, sigma: float, device, dtype):
    import torch

    ax = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    g = torch.exp(-(ax ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g.to(device=device, dtype=dtype)


def _sep_valid(x, g):
    """'valid' separable filtering of (B, 1, H, W) with the 1-D kernel g along both axes."""
    import torch.nn.functional as F

    n = g.numel()
    x = F.conv2d(x, g.view(1, 1, n, 1))
    return F.conv2d(x, g.view(1, 1, 1, n))


def _vifp(ref, dist):
    """Pixel-domain VIF (4 scales, sigma_n² = 2) of (B, 1, H, W) tensors on 0..255 -> (B,)."""
    import torch

    sigma_nsq = 2.0
    eps = 1e-10
    num = torch.zeros(ref.shape[0], device=ref.device, dtype=ref.dtype)
    den = torch.zeros_like(num)
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        g = _gauss(n, n / 5.0, ref.device, ref.dtype)
        if scale > 1:
            ref = _sep_valid(ref, g)[:, :, ::2, ::2]
            dist = _sep_valid(dist, g)[:, :, ::2, ::2]
        mu1, mu2 = _sep_valid(ref, g), _sep_valid(dist, g)
        s1 = (_sep_valid(ref * ref, g) - mu1 * mu1).clamp_min(0)
        s2 = (_sep_valid(dist * dist, g) - mu2 * mu2).clamp_min(0)
        s12 = _sep_valid(ref * dist, g) - mu1 * mu2
        gg = s12 / (s1 + eps)
        sv = s2 - gg * s12
        low1 = s1 < eps
        gg = torch.where(low1, torch.zeros_like(gg), gg)
        sv = torch.where(low1, s2, sv)
        s1 = torch.where(low1, torch.zeros_like(s1), s1)
        low2 = s2 < eps
        gg = torch.where(low2, torch.zeros_like(gg), gg)
        sv = torch.where(low2, torch.zeros_like(sv), sv)
        neg = gg < 0
        sv = torch.where(neg, s2, sv)
        gg = torch.where(neg, torch.zeros_like(gg), gg)
        sv = sv.clamp_min(eps)
        num = num + torch.log10(1 + gg * gg * s1 / (sv + sigma_nsq)).flatten(1).sum(1)
        den = den + torch.log10(1 + s1 / sigma_nsq).flatten(1).sum(1)
    return num / den.clamp_min(eps)


def _sobel(x):
    """Sobel responses as in the reference Qabf (scipy convolve2d 'same', zero padding)."""
    import torch
    import torch.nn.functional as F

    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=x.dtype, device=x.device)
    ky = torch.tensor([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=x.dtype, device=x.device)
    w = torch.stack([kx, ky]).unsqueeze(1)
    r = F.conv2d(F.pad(x, (1, 1, 1, 1)), w)
    return r[:, 0:1], r[:, 1:2]


#: Sobel magnitude (0..255 scale, about one grey level's step) below which the orientation's gradient is damped.
ANGLE_GRAD_SOFTNESS = 4.0
#: The orientation where the horizontal Sobel response is exactly 0 (``--qabf-zero-angle``): "reference", +pi/2
#: as medfuse.metrics.qabf takes it; "legacy", -pi/2 where the vertical response is negative and 0 on flat pixels,
#: as the loss took it when every stage of the shipped weights was trained (before commit b5e1f16).
ZERO_ANGLES = ("reference", "legacy")


def _check_zero_angle(zero_angle: str) -> None:
    """Raises InvalidInputError unless ``zero_angle`` is one of :data:`ZERO_ANGLES`."""
    if zero_angle not in ZERO_ANGLES:
        raise InvalidInputError(f"zero_angle must be one of {', '.join(ZERO_ANGLES)}, got {zero_angle!r}",
                                fix="use 'reference' (medfuse.metrics' Qabf) or 'legacy' (the loss the shipped "
                                    "weights were trained with)")


def _grad_angle(x, softness: float = ANGLE_GRAD_SOFTNESS, *, zero_angle: str = "reference"):
    """Sobel magnitude and orientation atan(gy/gx) in (-pi/2, pi/2], as the reference Qabf defines them.

    The values are exact. The orientation's gradient is scaled by g²/(g² + δ²) (δ = ``softness``; 0 leaves it
    exact): the exact one grows as 1/g where the image is flat, and Qabf weights those pixels by the source's
    gradient, so a few near-flat fused pixels beside a source edge dominated every batch's gradient. Undamped,
    Adam on the metric loss lowered Qabf even on the batch it was fitted to (docs/network.md, "Tenth round").

    ``zero_angle`` (:data:`ZERO_ANGLES`): the orientation where gx is exactly 0; "legacy" differs from the
    reference only there.
    """
    import torch

    _check_zero_angle(zero_angle)
    gx, gy = _sobel(x)
    g2 = gx * gx + gy * gy
    g = torch.sqrt(g2 + 1e-12)
    # Written with atan2 so its gradient stays finite at gx = 0. Where gx is exactly 0 the reference takes +pi/2
    # whatever gy's sign (and on flat pixels): atan2 gave -pi/2 or 0 there, and the logged Qabf was up to 2.5e-3
    # off medfuse.metrics.qabf on a Harvard pair (CT-MRI 20018, max rule). "legacy" keeps atan2's value: the
    # shipped weights' stages were trained on it, so their recipe reproduces with it only.
    a = torch.atan2(gy * torch.sign(gx + 1e-20), gx.abs() + 1e-12)
    if zero_angle == "reference":
        a = torch.where(gx == 0, torch.full_like(a, math.pi / 2), a)
    if softness > 0 and a.requires_grad:
        damp = (g2 / (g2 + softness ** 2)).detach()
        a = a.detach() + damp * (a - a.detach())
    return g, a


def _qabf(sources, fused, *, softness: float = ANGLE_GRAD_SOFTNESS, zero_angle: str = "reference"):
    """Xydeas-Petrović Qabf of (B, 1, H, W) tensors on 0..255 for any number of sources -> (B,).

    ``softness``, ``zero_angle``: see :func:`_grad_angle` (``softness`` sets the gradient only; the value is
    exact, and the reference one with the default ``zero_angle``).
    """
    import torch

    gf, af = _grad_angle(fused, softness, zero_angle=zero_angle)
    num, den = 0.0, 0.0
    for s in sources:
        gs, as_ = _grad_angle(s, softness, zero_angle=zero_angle)
        ratio = torch.minimum(gs, gf) / torch.maximum(gs, gf).clamp_min(1e-6)
        aaf = 1 - (as_ - af).abs() / (math.pi / 2)
        q = 0.9994 / (1 + torch.exp(-15 * (ratio - 0.5))) * 0.9879 / (1 + torch.exp(-22 * (aaf - 0.8)))
        num = num + (q * gs).flatten(1).sum(1)
        den = den + gs.flatten(1).sum(1)
    return num / den.clamp_min(1e-6)


def _ssim(x, y, *, data_range: float = 255.0):
    """skimage-default SSIM (7×7 uniform window, sample covariance) of (B, 1, H, W) -> (B,)."""
    import torch.nn.functional as F

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    cov = 49.0 / 48.0
    ux, uy = F.avg_pool2d(x, 7, 1), F.avg_pool2d(y, 7, 1)
    vx = cov * (F.avg_pool2d(x * x, 7, 1) - ux * ux)
    vy = cov * (F.avg_pool2d(y * y, 7, 1) - uy * uy)
    vxy = cov * (F.avg_pool2d(x * y, 7, 1) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def torch_metrics(fused, sources) -> Dict[str, "object"]:
    """Qabf, VIF (summed over sources), SSIM (summed, range 255 and range 2). Tensors (B, H, W) in 0..1."""
    f = fused.unsqueeze(1) * 255.0
    srcs = [s.unsqueeze(1) * 255.0 for s in sources]
    return {
        "Qabf": _qabf(srcs, f),
        "VIF": sum(_vifp(s, f) for s in srcs),
        "SSIM": sum(_ssim(f, s) for s in srcs),
        "SSIM_r2": sum(_ssim(f, s, data_range=2.0) for s in srcs),
    }


class MetricLoss:
    """``-(qabf_weight·Qabf + vif_weight·VIF/n) + ssim_weight·(1 - SSIM/n)`` on the reference metric definitions.

    ``zero_angle="legacy"`` takes the Qabf orientation where the horizontal gradient is 0 as the loss did when the
    shipped weights were trained (:data:`ZERO_ANGLES`); the Qabf it returns is then that loss's, not the reference
    value (:func:`torch_metrics`, which the validation table uses, always gives the reference one).
    """

    def __init__(self, *, vif_weight: float = 1.0, ssim_weight: float = 0.5, qabf_weight: float = 1.0,
                 angle_grad_softness: float = ANGLE_GRAD_SOFTNESS, zero_angle: str = "reference"):
        _check_zero_angle(zero_angle)
        self.vif_weight, self.ssim_weight, self.qabf_weight = vif_weight, ssim_weight, qabf_weight
        self.angle_grad_softness = angle_grad_softness
        self.zero_angle = zero_angle

    def __call__(self, fused, x, *, qabf_weight: Optional[float] = None, vif_weight: Optional[float] = None,
                 ssim_weight: Optional[float] = None):
        """Per-batch overrides (``None``: the constructor's weight) let one pair type train with other weights."""
        n = x.shape[1]
        qw = self.qabf_weight if qabf_weight is None else qabf_weight
        vw = self.vif_weight if vif_weight is None else vif_weight
        sw = self.ssim_weight if ssim_weight is None else ssim_weight
        f = fused.float().unsqueeze(1) * 255.0
        srcs = [x[:, i:i + 1].float() * 255.0 for i in range(n)]
        q = _qabf(srcs, f, softness=self.angle_grad_softness, zero_angle=self.zero_angle)
        v = sum(_vifp(s, f) for s in srcs) / n
        s = sum(_ssim(f, s_) for s_ in srcs) / n
        loss = -(qw * q + vw * v) + sw * (1 - s)
        return loss.mean(), {"Qabf": float(q.detach().mean()), "VIF": float(v.detach().mean() * n),
                             "SSIM": float(s.detach().mean() * n)}


# ============================================================================ validation
def _mi(f: np.ndarray, a: np.ndarray) -> float:
    from sklearn.metrics import mutual_info_score

    return float(mutual_info_score(a.ravel(), f.ravel()))


def _undefined_metrics(sources: Sequence[np.ndarray]) -> Dict[str, str]:
    """The validation metrics that have no value on these sources (0..1), and why, as :mod:`medfuse.metrics`
    defines them: VIF when a source is constant, Qabf when no source has an edge (both 0/0).

    Why here and not in :func:`_vifp` / :func:`_qabf`: the loss uses those and must stay finite, so they
    clamp the 0/0 (VIF's term to 0, Qabf to about 0.97 through its 1e-6 gradient floor); the validation table
    must not score such pairs. Both depend on the sources only, so one check covers every method.
    """
    from .. import metrics as M

    s255 = [np.asarray(s, dtype=np.float64) * 255.0 for s in sources]
    out = {}
    flat = [i + 1 for i, s in enumerate(s255) if math.isnan(M._vifp_pair(s, s))]
    if flat:
        out["VIF"] = f"source {'/'.join(map(str, flat))} constant (no information to preserve: 0/0)"
    if not any(M._sobel(s)[0].any() or M._sobel(s)[1].any() for s in s255):
        out["Qabf"] = "no source has an edge (nothing to preserve: 0/0)"
    return out


def _finite_means(d: Dict[str, List[float]]) -> Dict[str, float]:
    """Means over the finite values only (NaN when there is none), as medfuse.metrics' slice-wise means."""
    out = {}
    for k, v in d.items():
        a = np.asarray(v, dtype=np.float64)
        a = a[np.isfinite(a)]
        out[k] = float(a.mean()) if a.size else float("nan")
    return out


def validate(model, val_pairs: Dict[str, list], *, device="cpu", limit: Optional[int] = None,
             rules: Sequence[str] = ("max",), rule_cache: Optional[dict] = None
             ) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Mean metrics per pair type for the model and simple rules: {ptype: {method: {metric: value}}}.

    ``rule_cache`` (a dict the caller keeps between epochs) holds the rules' rows, which do not change from
    one epoch to the next, so each rule is fused and scored once per run rather than once per epoch.

    A metric that is undefined on a pair (VIF with a constant source, Qabf without any source edge; see
    :func:`_undefined_metrics`) is NaN for that pair and left out of the means, as :mod:`medfuse.metrics` does;
    one :class:`medfuse.metrics.UndefinedMetricWarning` per call says how many pairs each mean is over. A
    metric undefined on every pair of a type is NaN in the table.
    """
    import torch

    from ..metrics import UndefinedMetricWarning
    from .classical import fuse_arrays as classical
    from .infer import _pad_to  # the padding inference uses, so validation scores what fuse() would give

    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    left_out: List[str] = []
    cache = {} if rule_cache is None else rule_cache
    model.eval()
    for ptype, items in val_pairs.items():
        items = spread(items, limit)
        todo = [r for r in rules if (ptype, r, len(items)) not in cache]
        acc: Dict[str, Dict[str, List[float]]] = {}
        undefined: Dict[str, List[str]] = {}
        for a, b in items:
            x = load_pair(a, b)
            nan_of = _undefined_metrics([x[0], x[1]])
            for k, why in nan_of.items():
                undefined.setdefault(k, []).append(why)
            with torch.inference_mode():
                # Padded to the network's factor and cropped back, as fuse() does: a pair whose size is not a
                # multiple of it failed here with an internal error after a whole epoch.
                h, w = x.shape[1:]
                xt = _pad_to(torch.from_numpy(x)[None].to(device), model.factor, (2, 3))
                fused = {"network": model(xt)[0, :h, :w].float().cpu().numpy()}
            for r in todo:
                fused[r] = np.clip(classical([x[0], x[1]], method=r), 0, 1).astype(np.float32)
            for meth, f in fused.items():
                f8 = np.round(f * 255.0)
                ft = torch.from_numpy(f8 / 255.0).float()[None]
                m = torch_metrics(ft, [torch.from_numpy(x[i])[None] for i in range(2)])
                d = acc.setdefault(meth, {})
                for k, v in m.items():
                    d.setdefault(k, []).append(float("nan") if k in nan_of else float(v[0]))
                d.setdefault("MI", []).append(_mi(f8, x[0] * 255) + _mi(f8, x[1] * 255))
        rows = {m: _finite_means(d) for m, d in acc.items()}
        for k, whys in undefined.items():
            left_out.append(f"{k} on {len(whys)} of {len(items)} {ptype} pairs ({'; '.join(dict.fromkeys(whys))})")
        for r in todo:
            cache[(ptype, r, len(items))] = rows[r]
        table[ptype] = {"network": rows["network"], **{r: cache[(ptype, r, len(items))] for r in rules}}
    model.train()
    if left_out:
        warnings.warn(UndefinedMetricWarning("validation: no value for " + "; ".join(left_out) + ": left out of "
                                             "the means (NaN where no pair of a type has one)"), stacklevel=2)
    return table


def logit_excess(sel, n: int, cap: float):
    """Mean squared excess of selection logits (B*n, K, h, w) over ``cap`` from their mean over the n inputs.

    Why: the trained selection saturates (logit gaps of 15-120 on the Harvard pairs), which leaves the
    full-resolution "brighter/stronger wins" terms and any new loss without a gradient.
    """
    s = sel.float().reshape(-1, n, *sel.shape[1:])
    return ((s - s.mean(dim=1, keepdim=True)).abs() - cap).clamp_min(0.0).pow(2).mean()


MARGIN_RULES = ("max", "mean", "laplacian", "wavelet", "gff")


def gff_targets(x):
    """The guided-filter rule's fusion of every item of a (B, N, H, W) batch, as a tensor like ``x[:, 0]``."""
    import torch

    from .classical import fuse_arrays as classical

    xs = x.detach().float().cpu().numpy()
    out = np.stack([np.clip(classical(list(item), method="gff"), 0, 1) for item in xs]).astype(np.float32)
    return torch.from_numpy(out).to(x.device)


def rule_margins(table, metrics: Sequence[str] = ("Qabf", "VIF", "SSIM")) -> Dict[str, float]:
    """Per pair type, the network's worst relative margin over the best rule of ``table`` on ``metrics``.

    A metric with no value (NaN: undefined on every validation pair of the type, see :func:`validate`) is left
    out; a type with none left is NaN.
    """
    out = {}
    for ptype, rows in table.items():
        margins = []
        for k in metrics:
            ruled = [v[k] for m, v in rows.items() if m != "network" and math.isfinite(v[k])]
            if ruled and math.isfinite(rows["network"][k]):  # NaN made max() and min() depend on the order
                best = max(ruled)
                margins.append((rows["network"][k] - best) / abs(best))
        out[ptype] = min(margins) if margins else float("nan")
    return out


def rule_margin(table, metrics: Sequence[str] = ("Qabf", "VIF", "SSIM")) -> float:
    """Mean over pair types of the network's worst relative margin over the best rule, per metric.

    Positive means the network beats every rule in ``table`` on every metric of every pair type on average;
    this is what ``test_network_beats_every_classical_rule`` asks of a fixed subset.
    """
    per_type = [v for v in rule_margins(table, metrics).values() if math.isfinite(v)]
    return float(np.mean(per_type)) if per_type else float("nan")


def selection_score(table, *, ct_qabf: float = 0.0, ct_ssim: float = 0.0) -> float:
    """The score that picks ``medfuse train``'s best epoch (without ``--select-by-margin``).

    The mean over pair types of the network's Qabf + (VIF + SSIM) / 2 (what the goals measure), plus ``ct_qabf``
    and ``ct_ssim`` times the CT-MRI network's Qabf and SSIM (the goals the first weights missed). Each metric is
    averaged over the pair types where it is defined: a metric NaN on every validation pair of one type (see
    :func:`validate`) made the whole score NaN, and a NaN score never beats the best, so the run exported its
    first epoch whatever came later.
    """
    def mean_of(k):
        vals = [r["network"][k] for r in table.values() if math.isfinite(r["network"][k])]
        return float(np.mean(vals)) if vals else 0.0

    ct = table.get("CT-MRI", {}).get("network", {})
    extra = sum(w * v for w, v in ((ct_qabf, ct.get("Qabf", 0.0)), (ct_ssim, ct.get("SSIM", 0.0)))
                if w and math.isfinite(v))
    return mean_of("Qabf") + 0.5 * (mean_of("VIF") + mean_of("SSIM")) + extra


def format_table(table) -> str:
    lines = [f"{'pair':10s} {'method':8s} {'Qabf':>6s} {'VIF':>6s} {'SSIM':>6s} {'SSIMr2':>6s} {'MI':>6s}"]
    for ptype, rows in table.items():
        for meth, m in rows.items():
            lines.append(f"{ptype:10s} {meth:8s} {m['Qabf']:6.3f} {m['VIF']:6.3f} {m['SSIM']:6.3f} "
                         f"{m['SSIM_r2']:6.3f} {m['MI']:6.3f}")
    return "\n".join(lines)


# ============================================================================ checkpoint / export
def save_checkpoint(path: Path, model, opt, state: dict) -> None:
    """Write a training checkpoint atomically: a kill mid-write leaves the previous one intact and no partial file."""
    import torch

    from ..io._atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite=True) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "opt": opt.state_dict(),
                    "state": state}, tmp)


#: Columns of ``RUN_DIR/metrics.csv``: one row per epoch, pair type and method of the validation table.
METRICS_COLUMNS = ("epoch", "steps", "train_loss", "lr", "score", "elapsed_min", "pair", "method", "Qabf", "VIF",
                   "SSIM", "SSIM_r2", "MI")
METRICS_FILE = "metrics.csv"


def write_metrics(run_dir: Path, history: List[dict]) -> Path:
    """Rewrite ``RUN_DIR/metrics.csv`` (atomically) from a run state's ``history``: the per-epoch validation
    tables, training loss, learning rate and selection score, for pandas or a spreadsheet.

    Why from the history and not appended: the history lives in the checkpoint, so a run killed and resumed
    gets each epoch once (appending repeated the epochs a kill made it redo). Epoch 0 is the ``--init`` weights.
    Values a checkpoint of an earlier medfuse did not record are left empty.
    """
    import csv
    import io

    from ..io._atomic import atomic_path

    def cell(v, spec):
        return "" if v is None else format(v, spec)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(METRICS_COLUMNS)
    for h in history:
        elapsed = h.get("elapsed_s")
        head = [h["epoch"], h.get("steps", ""), cell(h.get("train_loss"), ".6f"), cell(h.get("lr"), ".6g"),
                cell(h.get("score"), ".6f"), cell(None if elapsed is None else elapsed / 60, ".2f")]
        for ptype, rows in h["table"].items():
            for meth, m in rows.items():
                w.writerow(head + [ptype, meth] + [f"{m[k]:.6f}" for k in METRICS_COLUMNS[8:]])
    path = Path(run_dir) / METRICS_FILE
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return path


def _random_streams(sampler, rng3) -> list:
    """Every random generator the 2-D stage draws from: the sampler's, MONAI's transforms', the 3-D patches'."""
    from monai.transforms import Randomizable

    monai = [t for t in [sampler.tf, *sampler.tf.transforms] if isinstance(t, Randomizable)]
    return [sampler.rng, rng3, *monai]


def rng_state(sampler, rng3) -> list:
    """The states of :func:`_random_streams` (and torch's), in types a ``weights_only`` checkpoint can hold, so
    that a resumed run draws exactly the batches the interrupted one would have drawn next."""
    import torch

    out: list = [torch.get_rng_state()]
    for g in _random_streams(sampler, rng3):
        if isinstance(g, np.random.Generator):
            out.append(g.bit_generator.state)
        else:  # a MONAI transform: its legacy np.random.RandomState
            name, key, pos, has_gauss, cached = g.R.get_state()
            out.append([name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)])
    return out


def set_rng_state(sampler, rng3, states: list) -> None:
    """Restore what :func:`rng_state` saved."""
    import torch

    torch.set_rng_state(states[0])
    for g, st in zip(_random_streams(sampler, rng3), states[1:], strict=True):
        if isinstance(g, np.random.Generator):
            g.bit_generator.state = st
        else:
            name, key, pos, has_gauss, cached = st
            g.R.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint's dict, read without executing code (``weights_only``); typed errors naming the file."""
    import torch

    if not Path(path).exists():
        raise UnreadableFileError("the training checkpoint is missing", path=path,
                                  fix="resume with --resume and more --epochs than the run has done, or start a "
                                      "new run with --overwrite or another --run-dir")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: no arbitrary unpickling
    except Exception as exc:  # noqa: BLE001
        raise UnreadableFileError(f"cannot read the training checkpoint ({type(exc).__name__})", path=path,
                                  fix="start a new run with --overwrite or another --run-dir"
                                  + _from_best(path)) from None
    fmt = ck.get("format", 1) if isinstance(ck, dict) else None  # checkpoints before the field are format 1
    if isinstance(fmt, int) and fmt > CHECKPOINT_FORMAT:
        raise UnreadableFileError(f"the training checkpoint is of format {fmt}, written by a newer medfuse; this one "
                                  f"reads format {CHECKPOINT_FORMAT}", path=path,
                                  fix="resume or start from it with the medfuse version that wrote it (or a newer "
                                      "one), or start a new run with --overwrite or another --run-dir")
    # A readable torch file of another kind (a bare state dict, a tensor) failed later with a KeyError.
    if not (isinstance(ck, dict) and isinstance(ck.get("model"), dict) and isinstance(ck.get("opt"), dict)
            and isinstance(ck.get("state"), dict) and isinstance(ck["state"].get("epoch"), int)):
        raise UnreadableFileError("the file is not a medfuse training checkpoint (it lacks the model, optimiser or "
                                  "run state)", path=path,
                                  fix="pass the last.ckpt/best.ckpt of a medfuse train run, or start a new run with "
                                      "--overwrite or another --run-dir")
    return ck


def load_checkpoint(path: Path, model, opt) -> dict:
    """Load a checkpoint into ``model`` (and ``opt`` unless None); returns its run state.

    Raises:
        UnreadableFileError: missing, unreadable or not a training checkpoint.
        InvalidInputError: its tensors or optimiser groups do not fit this model.
    """
    ck = _read_checkpoint(path)
    try:
        model.load_state_dict(ck["model"])
        if opt is not None:
            opt.load_state_dict(ck["opt"])
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes, tensor names or optimiser groups differ
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        detail = next((ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                      lines[0])
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        detail = detail.rstrip(".")  # torch's own sentence ends in one: "...([12, 4, 3, 3]).)." read doubled
        raise InvalidInputError(f"the checkpoint does not fit this model ({detail})", path=path,
                                fix="pass the architecture options (--width, --factor, --scan, --refine-head, "
                                    "--per-input-gain, --merge, --train-only-refine, ...) of the run that wrote it, "
                                    "or start a new run with --overwrite or another --run-dir") from None
    return ck["state"]


#: Options that may differ when a run is resumed: where files are, how fast it runs, and how long (``--epochs``,
#: which is warned about). Every other option changes what the run computes, and a changed one was ignored
#: (``--lr``: the optimiser state brought the old one back) or silently mixed two recipes (``--seed``: another
#: validation split).
RESUME_FREE = frozenset({"data", "out", "overwrite", "resume", "run_dir", "max_minutes", "max_steps", "threads",
                         "device", "epochs"})


def run_options(args: argparse.Namespace) -> Dict[str, str]:
    """The options that define a run (not :data:`RESUME_FREE`), as strings, for its checkpoints."""
    dests = [a.dest for a in add_arguments(argparse.ArgumentParser(add_help=False))._actions if a.dest != "help"]
    return {d: str(getattr(args, d, None)) for d in dests if d not in RESUME_FREE}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _unknown_zero_angle(path: Path, now: str) -> str:
    """The warning for a resumed checkpoint that does not record ``--qabf-zero-angle`` (written before the option).

    Why a warning and not a guess: such a checkpoint may come from before commit b5e1f16 (the loss took the
    ``legacy`` angle) or after it (``reference``), and it holds nothing that tells the two apart."""
    other = " or ".join(z for z in ZERO_ANGLES if z != now)
    return (f"{path} does not record --qabf-zero-angle (it was written before medfuse recorded it), so the Qabf "
            f"loss its epochs were trained with is unknown: legacy (that of the shipped weights) for a run started "
            f"with a medfuse before commit b5e1f16 (2026-12-06), reference for one started after it. The resumed "
            f"epochs train with this command's --qabf-zero-angle {now}, and the checkpoints they write record it. "
            f"If the run was trained with {other}, stop it (Ctrl-C) before its next epoch ends, while last.ckpt is "
            f"as it was, and resume with --qabf-zero-angle {other}: else its epochs mix the two losses")


def check_resume_options(args: argparse.Namespace, path: Path) -> List[str]:
    """Refuse ``--resume`` with options other than the checkpoint's run used; returns warnings to log.

    A checkpoint that does not record ``--qabf-zero-angle`` (one written before the option) gets a warning that
    its loss is unknown and how to choose it (:func:`_unknown_zero_angle`).

    Raises:
        InvalidInputError: an option that :data:`RESUME_FREE` does not list differs (all of them are named, and
            the fix gives the checkpoint's values of those that take one).
    """
    state = _read_checkpoint(path)["state"]
    saved = state.get("options")
    # A resume that trains nothing more (an export: no epoch left, no 3-D step) computes no loss to be unsure of.
    trains = args.epochs > state["epoch"] or (args.steps_3d > 0 and not args.train_only_refine)
    if saved is None:  # written before the options were recorded
        return [f"{path} does not record its run's options; they could not be checked against this command's"] + \
            ([_unknown_zero_angle(path, args.qabf_zero_angle)] if trains else [])
    now = run_options(args)
    changed = [k for k in sorted(saved) if saved[k] != now.get(k)]
    if changed:
        diff = [f"{_flag(k)} {saved[k]} (this command: {now.get(k)})" for k in changed]
        # The checkpoint's own values, ready to paste, for the options that take one (a switch's "True" is no
        # value to pass, and "None" was the default).
        given = [f"{_flag(k)} {saved[k]}" for k in changed if saved[k] not in ("True", "False", "None")]
        raise InvalidInputError("--resume continues a run that used other options: " + "; ".join(diff), path=path,
                                fix="resume with the options of the run that wrote the checkpoint ("
                                    + (" ".join(given) + "; " if given else "")
                                    + "its train.log and trained_by record them), or start a new run with "
                                      "--overwrite or another --run-dir")
    notes = [_unknown_zero_angle(path, args.qabf_zero_angle)] if trains and "qabf_zero_angle" not in saved else []
    done, planned = state["epoch"], state.get("epochs")
    if planned is not None and args.epochs > done and args.epochs != planned:
        notes.append(f"--epochs {args.epochs} differs from the run's {planned}: the cosine learning-rate schedule is "
                     f"stretched to {args.epochs} epochs from epoch {done + 1} on, so the result differs from an "
                     f"uninterrupted run of either length")
    return notes


def split_of(train_pairs: Dict[str, list], val_pairs: Dict[str, list]) -> Dict[str, Dict[str, List[str]]]:
    """{"train": {pair type: [case, ...]}, "val": {...}}: the run's split by case, recorded in its checkpoints."""
    def cases(pairs):
        return {k: sorted({case_of(a.name) for a, _ in v}) for k, v in pairs.items()}

    return {"train": cases(train_pairs), "val": cases(val_pairs)}


def data_fingerprint(pairs: Dict[str, list], root: Path) -> Dict[str, str]:
    """{pair type: SHA-256 (hex) of its pairs' file names (relative to ``root/<type>``) and sizes}, sorted.

    The identity of the data a run trained and validated on, without reading it: recorded in the checkpoints and
    the export's card, so that a fine-tune can tell whether its ``--data`` is the data its ``--init`` weights saw
    (:func:`init_val_overlap`), and a card says what its weights were trained on.
    """
    out = {}
    for ptype, items in pairs.items():
        base = Path(root) / ptype
        lines = sorted(f"{Path(p).relative_to(base).as_posix()}\t{Path(p).stat().st_size}\n"
                       for pair in items for p in pair)
        out[ptype] = hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
    return out


#: :func:`data_fingerprint` of the Harvard pairs in the team's ``shared/data/harvard-pairs`` (163 CT-MRI, 269
#: PET-MRI, 288 SPECT-MRI pairs): the data every stage of the shipped weights was trained on. Cards and
#: checkpoints written before the fingerprint was recorded are taken as trained on it.
HARVARD_FINGERPRINT = {
    "CT-MRI": "4c18246721d3a5e44ab98fc573202eb1f4a8ab3fc41e711176ff89668087887d",
    "PET-MRI": "bca3a33e4923a816e70f308d72b6c8db05f1f147cf277aeb3fd810e7a304de7b",
    "SPECT-MRI": "67c79dc71df159c535a7ba7c45bb7cba23d290ecd3160eb52fd6e9dfb1acf175",
}


def check_resume_split(path: Path, split: Dict[str, Dict[str, List[str]]]) -> List[str]:
    """Refuse ``--resume`` when the data's split by case differs from the one the run trained and validated on;
    returns warnings to log.

    Why: ``--data`` may change on a resume (the folder moved), and the split is redone from what the folder holds
    now: two cases added to it moved a validation case into training (it had been trained on, then picked the
    best epoch and was recorded as held out in the export's card).

    Raises:
        InvalidInputError: a pair type's training or validation cases differ (each difference is named).
    """
    saved = _read_checkpoint(path)["state"].get("cases")
    if saved is None:  # written before the split was recorded
        return [f"{path} does not record its run's split by case; the data's split could not be checked against "
                "the one the run trained on"]
    diff = []
    for part, name in (("val", "validation"), ("train", "training")):
        before, now = saved.get(part, {}), split.get(part, {})
        for ptype in sorted(set(before) | set(now)):
            b, n = set(before.get(ptype, [])), set(now.get(ptype, []))
            if b != n:
                change = [f"{w} {', '.join(sorted(c, key=_case_key))}" for w, c in (("now also", n - b),
                                                                                     ("no longer", b - n)) if c]
                diff.append(f"{ptype} {name} cases {'; '.join(change)}")
    if diff:
        raise InvalidInputError("--resume continues a run whose split by case differs from what --data holds now ("
                                + "; ".join(diff) + "), so the resumed epochs would train or validate on other "
                                "cases than the earlier ones (a case validated on after it was trained on)", path=path,
                                fix="resume with the --data folder as it was when the run started (its train.log "
                                    "lists the validation cases), or start a new run with --overwrite or another "
                                    "--run-dir to train on the data as it is now")
    return []


def _case_key(case: str):
    return (0, int(case), "") if case.isascii() and case.isdigit() else (1, 0, case)


def _init_record(path: Optional[Path]) -> Optional[dict]:
    """What ``--init`` weights record of their training run: {"val": {pair type: [case, ...]}, "fingerprint":
    {pair type: sha256} or None, "seed", "val_fraction"} from a safetensors export's card (``<stem>.json``) or a
    training checkpoint's state; None where neither records the validation cases."""
    if path is None:
        return None
    path = Path(path)
    if str(path).endswith(".safetensors"):
        try:
            card = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            held, fp = card.get("val_cases"), card.get("data_fingerprint")
            seed, frac = card.get("seed"), card.get("val_fraction")
        except (OSError, ValueError, AttributeError):
            return None  # no card, or an unreadable one: nothing to compare with
    else:
        try:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)["state"]
            held, fp = state["cases"]["val"], state.get("data_fingerprint")
            options = state.get("options") or {}
            seed, frac = options.get("seed"), options.get("val_fraction")
        except Exception:  # noqa: BLE001 - a bare state dict, an older checkpoint: nothing recorded
            return None
    if not isinstance(held, dict):
        return None
    return {"val": {str(k): [str(c) for c in v] for k, v in held.items() if isinstance(v, (list, tuple))},
            "fingerprint": {str(k): str(v) for k, v in fp.items()} if isinstance(fp, dict) else None,
            "seed": seed, "val_fraction": frac}


def init_held_out(path: Optional[Path]) -> Optional[Dict[str, List[str]]]:
    """The validation cases the ``--init`` weights were held out from: a safetensors export's card
    (``<stem>.json``, ``val_cases``) or a training checkpoint's recorded split; None where neither records them."""
    rec = _init_record(path)
    return None if rec is None else rec["val"]


def init_same_data(path: Optional[Path], fingerprint: Dict[str, str]) -> Dict[str, bool]:
    """Per pair type of ``fingerprint`` (:func:`data_fingerprint` of this run's data) that the ``--init`` weights
    record validation cases of: whether they were trained on the same files. Weights whose card or checkpoint
    records no fingerprint (written before it was recorded, the shipped weights' included) are taken as trained
    on the Harvard pairs (:data:`HARVARD_FINGERPRINT`). {} when the weights record no split."""
    rec = _init_record(path)
    if rec is None:
        return {}
    theirs = rec["fingerprint"] if rec["fingerprint"] is not None else HARVARD_FINGERPRINT
    return {t: theirs.get(t) == fp for t, fp in fingerprint.items() if t in rec["val"]}


def init_val_overlap(path: Optional[Path], val_cases: Dict[str, List[str]], *,
                     fingerprint: Optional[Dict[str, str]] = None) -> Dict[str, List[str]]:
    """Per pair type, this run's validation cases that the ``--init`` weights were *not* held out from (so trained
    on, if they were trained on this data): {} when there are none or the weights record no split.

    ``fingerprint`` (:func:`data_fingerprint` of the data ``val_cases`` come from): only the pair types whose data
    is the data the weights were trained on (:func:`init_same_data`) are compared; a case of the same name in
    other data is another image. None compares every pair type by case names alone.

    Why: fine-tuning with another --seed or --val-fraction than the starting weights' validated on cases those
    weights had trained on, and the --init weights compete as epoch 0, so the export's validation and its choice
    of epoch were optimistic, silently.
    """
    held = init_held_out(path)
    if not held:
        return {}
    same = None if fingerprint is None else init_same_data(path, fingerprint)
    out = {}
    for ptype, cases in val_cases.items():
        if ptype in held and (same is None or same.get(ptype)):  # a pair type the card does not list: unknown
            seen = sorted(set(cases) - set(held[ptype]), key=_case_key)
            if seen:
                out[ptype] = seen
    return out


def check_finite(tensors, what: str) -> None:
    """Refuse weights holding NaN/inf (a diverged run): they exported fine and only ``fuse`` refused them later.

    ``tensors``: a model or a {name: tensor} dict. Raises :class:`~medfuse.errors.WeightsError` naming the first
    bad tensor.
    """
    import torch

    items = tensors.state_dict().items() if hasattr(tensors, "state_dict") else tensors.items()
    for name, t in items:
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WeightsError(f"{what}: tensor {name} holds NaN or infinite values (the training diverged); "
                               "nothing was exported",
                               fix="lower --lr, or check the loss-weight options (--vif-weight, --ssim-weight, "
                                   "--qabf-weight, --plane-weight, --hot-spot-weight, ...)")


def code_version() -> Dict[str, Any]:
    """The versions a card records: medfuse, torch, MONAI and NumPy, and the git commit of the medfuse checkout
    (``git_commit``, with ``git_dirty`` when its tracked files differ from it); the git entries are None when
    medfuse is not a git checkout (an installed package) or git cannot tell."""
    import subprocess
    from importlib import metadata

    from .. import __version__

    def version(dist: str) -> Optional[str]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    out: Dict[str, Any] = {"medfuse": __version__, "torch": version("torch"), "monai": version("monai"),
                           "numpy": np.__version__, "git_commit": None, "git_dirty": None}
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            def git(*argv):
                return subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True, timeout=10)

            head = git("rev-parse", "HEAD")
            if head.returncode == 0 and head.stdout.strip():
                out["git_commit"] = head.stdout.strip()
                changed = git("diff", "--quiet", "HEAD", "--", "medfuse").returncode  # 0 same, 1 differs
                out["git_dirty"] = {0: False, 1: True}.get(changed)
        except (OSError, subprocess.SubprocessError):  # no git, a timeout
            out["git_commit"] = out["git_dirty"] = None
    return out


def export_weights(model, out_dir: Union[str, os.PathLike], meta: Optional[dict] = None, *,
                   overwrite: bool = True) -> Path:
    """Write ``medfuse_fusion.safetensors`` (+ its card ``medfuse_fusion.json``) atomically: the one way to save a
    :class:`~medfuse.fusion.network.FusionNet` that ``medfuse.fuse(weights=)`` and ``medfuse train --init`` read.

    The safetensors file holds the model's architecture config as metadata, which loading needs (a bare
    ``save_file(model.state_dict(), ...)`` lacks it and is refused); the card records ``meta``, the config, the
    file's SHA-256 and :func:`code_version`. From a training loop of your own::

        from medfuse.fusion.train import export_weights
        export_weights(model, "mine", {"note": "my loop"}, overwrite=False)   # mine/medfuse_fusion.safetensors

    Args:
        model: the FusionNet (any device; its tensors are written as float32 on the CPU).
        out_dir: the folder (made when missing).
        meta: entries for the card (``medfuse train`` records its command, split, validation...).
        overwrite: ``False`` refuses existing files (:class:`~medfuse.errors.OutputExistsError`).

    Returns:
        The safetensors file's path.

    Raises:
        WeightsError: a tensor holds NaN or infinite values (nothing is written).
        OutputExistsError: the files exist and ``overwrite`` is False.
    """
    from safetensors.torch import save_file

    from ..io._atomic import atomic_path

    out_dir = Path(out_dir)
    meta = dict(meta or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "medfuse_fusion.safetensors"
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {k: str(v) for k, v in model.config().items()}
    check_finite(tensors, f"the weights for {target}")  # before any write: an existing export stays as it was
    if not overwrite:
        _check_export(out_dir, overwrite=False)
    with atomic_path(target, overwrite=True) as tmp:
        # One metadata entry only: safetensors writes several in a random order, so the same tensors
        # would give files with different SHA-256 sums from one export to the next.
        save_file(tensors, str(tmp), metadata={"config": json.dumps(config, sort_keys=True)})
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    meta = {"format": "medfuse-fusion-v1", **meta, "config": model.config(), "sha256": digest,
            "code": code_version()}
    with atomic_path(out_dir / "medfuse_fusion.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
    return target


EXPORT_FILES = ("medfuse_fusion.safetensors", "medfuse_fusion.json")


def _check_export(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing export (the shipped weights, say) unless ``overwrite``, and an export folder
    this user cannot write: found before the training, not after it (a root-owned install's weights folder was
    refused after 13 minutes of training and the 3-D stage)."""
    for name in EXPORT_FILES:
        if (Path(out_dir) / name).exists() and not overwrite:
            raise OutputExistsError("the weights file exists", path=Path(out_dir) / name,
                                    fix="pass --overwrite to replace it, or another --out folder")
    from ..errors import OutputWriteError
    from ..io.writers import _probe_writable

    folder = Path(out_dir)
    if folder.is_dir():
        _probe_writable(folder / EXPORT_FILES[0])
        return
    above = folder.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if above.is_dir() and not os.access(above, os.W_OK | os.X_OK):  # the folder could not be made at the end
        import errno as _errno

        raise OutputWriteError("the --out folder does not exist and cannot be made there (permission denied)",
                               errno=_errno.EACCES, fix="pass an --out folder you can write to", path=folder)


# ============================================================================ 3-D stage
def _anisotropy_t(vol, sources):
    """Per axis: roughness (mean |2nd difference|) relative to the sources', over that of the other two axes.

    A fusion that treats the axes alike keeps the sources' anisotropy; slice-wise behaviour raises one axis.
    """
    import torch

    def rough(v, ax):
        return torch.diff(v, n=2, dim=ax).abs().mean()

    r = torch.stack([rough(vol, ax) / torch.stack([rough(s, ax) for s in sources]).max().clamp_min(1e-6)
                     for ax in range(3)])
    return torch.stack([r[i] / (r.sum() - r[i]).mul(0.5).clamp_min(1e-6) for i in range(3)])


def _train_3d(model, vols, *, steps, device, loss_fn, seed, log, plane_weight: float = 0.0):
    """Fine-tune the tri-plane aggregation (and only it) on 3-D patches: slice losses along all three axes.

    ``plane_weight`` adds a through-plane consistency term: the squared gap, per axis, between the fused
    patch's anisotropy and that of the plain mean of the inputs (which involves no slicing at all).
    """
    import torch

    if not vols or steps <= 0:
        return
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.agg.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.agg.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed + 3)
    for step in range(steps):
        x = _patch_3d(vols, rng, device)
        if x is None:
            continue
        loss, _ = loss_3d(model, x, loss_fn, plane_weight=plane_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            log(f"3-D stage step {step}: loss {float(loss.detach()):.4f}")
    for p in model.parameters():
        p.requires_grad_(True)


def _patch_3d(vols, rng, device, *, size: int = 64):
    """A random (N, size, size, size) patch of one volume set as a tensor, or None if it is mostly empty."""
    import torch

    vol = vols[int(rng.integers(len(vols)))]
    starts = [int(rng.integers(0, max(1, s - size + 1))) for s in vol.shape[1:]]
    patch = vol[:, starts[0]:starts[0] + size, starts[1]:starts[1] + size, starts[2]:starts[2] + size]
    if min(patch.shape[1:]) < size or patch.mean() < 0.05:
        return None
    return torch.from_numpy(np.ascontiguousarray(patch)).to(device)


def loss_3d(model, x, loss_fn, *, plane_weight: float = 0.0, slices: bool = True):
    """Tri-plane loss of one patch x (N, D, H, W): slice losses along all three axes (+ the plane term).

    ``slices=False`` leaves only the plane term (the 2-D stage's own loss already covers the slices).

    Returns (loss, gap) where gap is the worst per-axis anisotropy gap to the mean rule (a float).
    """
    import torch

    fused = forward_3d_train(model, x)
    loss = 0.0
    ps = x.shape[1]
    idx = torch.tensor([ps // 8, 3 * ps // 8, 5 * ps // 8, 7 * ps // 8], device=x.device)
    for axis in range(3 if slices else 0):
        f2 = fused.index_select(axis, idx).movedim(axis, 0)
        x2 = x.index_select(1 + axis, idx).movedim(1 + axis, 0)
        l, _ = loss_fn(f2, x2)
        loss = loss + l / 3
    srcs = list(x)
    gap = _anisotropy_t(fused, srcs) - _anisotropy_t(x.mean(0), srcs).detach()
    if plane_weight > 0:
        loss = loss + plane_weight * (gap ** 2).sum()
    return loss, float(gap.detach().abs().max())


def forward_3d_train(model, x):
    """Differentiable tri-plane forward of one small volume x (N, D, H, W) -> (D, H, W)."""
    from .network import _pool, _up, decompose

    xb = x[None]
    base, details = decompose(xb, model.levels)
    feats = [_pool(xb, model.factor)] + [_pool(d.abs(), model.factor) for d in details]
    feats3 = torch_stack(feats)[0]  # (N, C, d, h, w)
    logits = model.planes_logits(feats3)
    return model.combine(xb, base, details, _up(logits[None], model.factor))[0]


def torch_stack(feats):
    import torch

    return torch.stack(feats, dim=2)


# ============================================================================ selection probes
def parts_probe(model, *, size: int = 128, device="cpu") -> float:
    """Correlation of the fused image with the sum of three inputs with disjoint supports (worst of 2 and 3).

    The inputs are a bright square frame (like bone), a textured disc and a ramp between them: any sensible
    fusion keeps every part, so a model that follows one input everywhere scores low.
    """
    import torch
    from scipy import ndimage as ndi

    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    cheb, rad = np.maximum(np.abs(yy), np.abs(xx)), np.hypot(yy, xx)
    tex = ndi.gaussian_filter(np.random.default_rng(7).random((size, size)), 3.0)
    tex = 0.4 + 0.5 * (tex - tex.min()) / (tex.max() - tex.min())
    frame = ((cheb > 0.8) & (cheb < 0.92)) * 0.85
    disc = (rad < 0.55) * tex
    ramp = ((rad >= 0.55) & (cheb <= 0.8)) * (0.25 + 0.5 * (yy + 1) / 2)
    parts = [frame, disc, ramp]
    worst = 1.0
    for group in (parts, parts[:2], [parts[1], parts[2]]):
        x = torch.from_numpy(np.stack(group).astype(np.float32))[None].to(device)
        with torch.no_grad():
            out = model(x)[0].cpu().numpy()
        worst = min(worst, float(np.corrcoef(out.ravel(), sum(group).ravel())[0, 1]))
    return worst


def plane_probe(model, *, device="cpu", size: int = 96) -> float:
    """Worst per-axis anisotropy gap to the mean rule on the centre of a noise-free phantom (T1 + T2).

    Noise-free, because image noise dominates the roughness and would hide a slice-wise artefact.
    """
    import torch

    from ..phantom import make_phantom

    ph = make_phantom(seed=1, noise=False, misalign={"pet": None, "spect": None})
    v = np.stack([_norm01(ph.t1.array), _norm01(ph.t2.array)])
    sl = tuple(slice(max(0, s // 2 - size // 2), max(0, s // 2 - size // 2) + size) for s in v.shape[1:])
    x = torch.from_numpy(np.ascontiguousarray(v[(slice(None),) + sl])).to(device)
    with torch.no_grad():
        fused = forward_3d_train(model, x)
        gap = _anisotropy_t(fused, list(x)) - _anisotropy_t(x.mean(0), list(x))
    return float(gap.abs().max())


# ============================================================================ CLI
#: ``--init shipped``: the weights shipped inside the package (:func:`medfuse.fusion.infer.default_weights_path`).
SHIPPED = "shipped"


def _replaces_shipped(out: Path) -> bool:
    """Whether an export into ``out`` would replace the shipped weights."""
    from .infer import default_weights_path

    target = Path(out) / EXPORT_FILES[0]
    shipped = default_weights_path()
    try:
        return target.exists() and os.path.samefile(target, shipped)
    except OSError:
        return False


#: The examples ``medfuse train --help`` shows.
HELP_EXAMPLES = """\
examples:
  medfuse train --data mydata --init shipped --epochs 4 --lr 2e-4 \\
      --run-dir runs/mine          # fine-tune the shipped weights on your own pairs (mydata/harvard-pairs/...)
  medfuse train --data mydata --run-dir runs/mine --resume     # go on after a cancel or a crash
  medfuse train --data mydata --epochs 1 --steps-per-epoch 5 --steps-3d 0 --run-dir runs/try   # a quick trial
With no options a run of about an hour on 2 CPU cores starts (12 epochs), in runs/fusion under the current folder.
"""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``medfuse train`` (the CLI helper wires them under the ``train`` sub-command)."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder holding harvard-pairs/ and optionally brats-gli-00001/, spm12-templates/ "
                             + (f"(default: shared/data beside the medfuse repository, {DEFAULT_DATA}). "
                                if DEFAULT_DATA is not None else "(required: an installed medfuse has no default). ")
                             + "Your own 2-D pairs: harvard-pairs/CT-MRI/{MRI,CT}/, PET-MRI/{MRI,PET}/ "
                             "and/or SPECT-MRI/{MRI,SPECT}/, same-named PNGs per pair, named CASE + 3-digit slice "
                             "(28010.png), at least two cases per pair type (split by case)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder the safetensors weights (+ JSON card) go to (default RUN_DIR/export); to "
                             "replace the shipped weights pass --out medfuse/fusion/weights --overwrite (back them "
                             "up first: the run warns, and only a reinstall or git restores them)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/fusion"),
                        help="checkpoints (last.ckpt, best.ckpt), train.log and metrics.csv (per-epoch validation "
                             "table, loss, learning rate of the epoch's last step, score); default: runs/fusion "
                             "under the current folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing weights in --out, and start a new run in a --run-dir that holds an "
                             "earlier run's checkpoints (without --resume); with --resume it replaces the export "
                             "only, and the run goes on from its checkpoints")
    # Defaults shown: with none given, a run of about an hour on 2 CPU cores starts (12 epochs of ~5 minutes).
    parser.add_argument("--epochs", type=int, default=12, help="2-D training epochs (default: %(default)s)")
    parser.add_argument("--steps-per-epoch", type=int, default=100, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=6, help="(default: %(default)s)")
    parser.add_argument("--crop", type=int, default=160, help="training crop size in pixels (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of each pair type's cases kept for validation (split by case and --seed; default 0.2, as 'medfuse evaluate --split' assumes: pass it the same value)")
    # The loss: -(qabf_weight*Qabf + vif_weight*VIF/n) + ssim_weight*(1 - SSIM/n), n inputs.
    parser.add_argument("--vif-weight", type=float, default=1.0,
                        help="weight a of the VIF term of the loss -(Qabf + a*VIF/n) + b*(1 - SSIM/n), n inputs "
                             "(default: %(default)s; the shipped weights' recipe: 0.8)")
    parser.add_argument("--ssim-weight", type=float, default=0.5,
                        help="weight b of the SSIM term of the loss (default: %(default)s; the shipped weights' "
                             "recipe: 1.0)")
    parser.add_argument("--qabf-weight", type=float, default=1.0,
                        help="weight of the Qabf term of the loss (default: %(default)s)")
    parser.add_argument("--qabf-grad-softness", type=float, default=ANGLE_GRAD_SOFTNESS,
                        help="damp the gradient of the Qabf loss's orientation term where the fused image is flatter "
                             "than this Sobel magnitude (0..255 scale); 0 gives the exact gradient, with which "
                             "stages 1-5 of the shipped weights were trained (default: %(default)s)")
    parser.add_argument("--qabf-zero-angle", choices=ZERO_ANGLES, default="reference",
                        help="the Qabf loss's orientation where the horizontal gradient is exactly 0: reference "
                             "(+pi/2, as medfuse.metrics and the validation table take it) or legacy (the loss "
                             "every stage of the shipped weights was trained with: their recipe reproduces with "
                             "legacy only). The logged validation Qabf is the reference one either way "
                             "(default: %(default)s)")
    parser.add_argument("--ct-gff-weight", type=float, default=0.0,
                        help="weight of an L1 pull towards the guided-filter rule's output on CT-MRI batches")
    parser.add_argument("--ct-target-weight", type=float, default=0.0,
                        help="weight of an L1 pull towards per-image optimised teacher images on CT-MRI batches "
                             "(made once per run, cached in RUN_DIR; see medfuse.fusion.targets)")
    parser.add_argument("--ct-target-iters", type=int, default=150,
                        help="Adam steps per training pair when making the CT-MRI teacher images")
    parser.add_argument("--ct-target-kind", choices=("mixing", "pixels"), default="mixing",
                        help="teacher images searched in the network's own output family from its --init "
                             "weights (mixing), or free pixels from the guided-filter rule's output (pixels)")
    parser.add_argument("--ct-target-smooth", type=int, default=0,
                        help="mixing teachers: the change to the network's maps is a K×K box average at 1/4 "
                             "resolution (0: free per pixel)")
    parser.add_argument("--ct-vif-weight", type=float, default=None,
                        help="VIF weight on CT-MRI batches only (default: --vif-weight)")
    parser.add_argument("--ct-ssim-weight", type=float, default=None,
                        help="SSIM weight on CT-MRI batches only (default: --ssim-weight)")
    parser.add_argument("--ct-qabf-weight", type=float, default=None,
                        help="weight of the Qabf term on CT-MRI batches only (default: --qabf-weight)")
    parser.add_argument("--select-ct-qabf", type=float, default=0.0,
                        help="extra weight of the CT-MRI Qabf in the score that picks the exported epoch")
    parser.add_argument("--select-by-margin", action="store_true",
                        help="select the epoch by its worst relative margin over every classical rule on Qabf, VIF "
                             "and SSIM (mean over pair types) instead of the default score")
    parser.add_argument("--select-ct-ssim", type=float, default=0.0,
                        help="extra weight of the CT-MRI SSIM in the score that picks the exported epoch")
    parser.add_argument("--extra-fraction", type=float, default=0.15,
                        help="share of batches drawn from BraTS/SPM12/phantom slices instead of Harvard pairs")
    parser.add_argument("--three-input-fraction", type=float, default=0.0,
                        help="fraction of Harvard batches turned into 3 inputs (one input split in two parts)")
    parser.add_argument("--ct-weight", type=float, default=1.0,
                        help="how much more often CT-MRI batches are drawn than PET/SPECT-MRI ones")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from these weights: a .safetensors export, a last.ckpt/best.ckpt of an earlier "
                             "run, or a FusionNet state_dict saved with torch.save (the architecture options must "
                             "match; the error names those that differ); 'shipped': the weights shipped with "
                             "medfuse, from any folder")
    parser.add_argument("--width", type=int, default=16,
                        help="channels of the low-resolution encoder (default: %(default)s, the shipped weights'; "
                             "must match --init weights)")
    parser.add_argument("--factor", type=int, default=None,
                        help="downsampling factor of the learned part (1, 2, 4 or 8); stored with the weights. Default: "
                             "the --init safetensors export's value, else 4")
    parser.add_argument("--scan", type=int, default=0,
                        help="state size of a four-direction selective scan after the mixing (0: none)")
    parser.add_argument("--scan-lr", type=float, default=None,
                        help="learning rate of the scan's parameters (default: --lr); a scan added to trained "
                             "weights starts from zero and needs a larger one")
    parser.add_argument("--per-input-gain", action="store_true", help="a detail gain per input (else shared)")
    parser.add_argument("--refine-head", type=int, default=None,
                        help="width of a full-resolution head that corrects the 2-D selection logits (0: none); "
                             "stored with the weights. Weights without one start it at zero, so the model starts "
                             "as exactly those weights. Default: the --init safetensors export's value, else 0")
    parser.add_argument("--train-only-refine", action="store_true",
                        help="train only the refinement head; every other parameter stays as --init gave it (the "
                             "3-D stage, which trains the tri-plane merge, is skipped)")
    parser.add_argument("--empty-guard", type=int, default=None,
                        help="odd K: an input that is exactly 0 over a K×K neighbourhood where another input is "
                             "not gets no weight there (0: off); stored with the weights. Default: the value "
                             "of the --init safetensors export (the shipped weights: 3), else 0")
    parser.add_argument("--merge", choices=("convex", "conv"), default="convex",
                        help="tri-plane merge: a learned convex 3x3x3 kernel, or the unconstrained convolution "
                             "the stage 1-4 weights were trained with")
    parser.add_argument("--coarse-pixel-rule-3d", type=int, default=None,
                        help="in 3-D only, the number of coarsest detail levels chosen by the pixel rule (stronger "
                             "detail wins) instead of the learned selection; stored with the weights. Default: "
                             "the --init safetensors export's value (the shipped weights: 2), else 0")
    parser.add_argument("--coarse-rule-learned", type=float, default=None,
                        help="at the levels --coarse-pixel-rule-3d leaves to the pixel rule, the weight (0..1) of the "
                             "learned selection logits kept beside it (0: the pixel rule alone); stored with the "
                             "weights. Default: the --init safetensors export's value (the shipped weights: "
                             "0.005), else 0")
    parser.add_argument("--functional-k", type=float, default=None,
                        help="for volumes with a known PET/SPECT input, the sharpness of the 'brighter input at that "
                             "scale wins' choice of the base and the --coarse-pixel-rule-3d levels (0: off, the "
                             "stronger-detail rule); stored with the weights. Default: the --init safetensors "
                             "export's value (the shipped weights: 30), else 0")
    parser.add_argument("--functional-base-learned", type=float, default=None,
                        help="with --functional-k, the weight (0..1) of the learned base selection kept beside it "
                             "(default: the --init export's value, the shipped weights' 0.1)")
    parser.add_argument("--functional-coarse-learned", type=float, default=None,
                        help="with --functional-k, the weight (0..1) of the learned selection of those coarse levels "
                             "kept beside it (default: the --init export's value, the shipped weights' 0.0075)")
    parser.add_argument("--steps-3d", type=int, default=60,
                        help="steps of the tri-plane aggregation stage (default 60; they run after --epochs 0 too: "
                             "pass 0 with --epochs 0 --init to re-export the weights unchanged)")
    parser.add_argument("--plane-weight", type=float, default=0.0,
                        help="weight of the through-plane consistency term of the 3-D stage")
    parser.add_argument("--joint-3d-every", type=int, default=0,
                        help="add a 3-D patch loss (all parameters) every K steps of the 2-D stage (0: never)")
    parser.add_argument("--select-min-ct-mi", type=float, default=None,
                        help="an epoch can only be exported if its CT-MRI MI (validation subset) is at least this")
    parser.add_argument("--select-min-parts", type=float, default=None,
                        help="an epoch can only be exported if its disjoint-parts probe is at least this")
    parser.add_argument("--select-max-plane-gap", type=float, default=None,
                        help="an epoch can only be exported if its through-plane probe gap is at most this")
    parser.add_argument("--joint-3d-plane-only", action="store_true",
                        help="the joint 3-D patch loss is the through-plane term alone (no slice metric losses)")
    parser.add_argument("--hot-spot-fraction", type=float, default=0.0,
                        help="share of PET/SPECT-MRI training items given a synthetic hot spot (hotspots.py)")
    parser.add_argument("--hot-spot-weight", type=float, default=0.0,
                        help="weight of the loss that keeps those hot spots at least as visible as the mean rule")
    parser.add_argument("--logit-cap", type=float, default=None,
                        help="penalise selection logits further than this from the inputs' mean (unsaturates "
                             "the soft-max so the pixel terms and the hot-spot loss can act)")
    parser.add_argument("--logit-penalty", type=float, default=1e-4, help="weight of the --logit-cap penalty")
    parser.add_argument("--val-limit", type=int, default=12,
                        help="validation pairs per type each epoch (the final validation: 3x as many)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop the 2-D stage after this long (the 3-D stage and the export still run). The "
                             "steps taken then depend on the machine's speed, so such a run is not reproducible "
                             "elsewhere; its log and card give the steps taken, for --max-steps")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop the 2-D stage after this many optimiser steps in all (the learning-rate schedule "
                             "stays that of --epochs x --steps-per-epoch): a reproducible --max-minutes")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of torch (default: %(default)s)")
    parser.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                        help="where to train (default: auto, a CUDA GPU when there is one, else the CPU)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from RUN_DIR/last.ckpt (with the same architecture options)")
    return parser


def _init_state(path: Path) -> dict:
    """The tensors of ``--init`` weights: a safetensors export, a training checkpoint, or a bare state dict
    (``torch.save(model.state_dict(), ...)``), read without executing code (``weights_only``).

    Raises:
        UnreadableFileError: unreadable, of a newer checkpoint format, or a torch file that holds no tensors.
    """
    if str(path).endswith(".safetensors"):
        from .infer import _check_recorded_hash

        # Why: a corrupted byte still loads, and the run would fine-tune other weights than its card names;
        # fuse(weights=) refuses such a file, and so does a fine-tune (a WeightsError naming the file).
        _check_recorded_hash(Path(path))
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        ck = _torch_load(path)  # weights_only: no unpickling
    except Exception as exc:  # noqa: BLE001 - safetensors/torch raise several types for a bad file
        raise _unreadable_init(path, exc) from None
    if isinstance(ck, dict) and isinstance(ck.get("model"), dict):  # a training checkpoint
        fmt = ck.get("format", 1)
        if isinstance(fmt, int) and fmt > CHECKPOINT_FORMAT:
            raise UnreadableFileError(f"the --init checkpoint is of format {fmt}, written by a newer medfuse; this "
                                      f"one reads format {CHECKPOINT_FORMAT}", path=path,
                                      fix="use the medfuse version that wrote it, or its safetensors export")
        ck = ck["model"]
    import torch

    if not (isinstance(ck, dict) and ck and all(isinstance(v, torch.Tensor) for v in ck.values())):
        # It failed with a bare KeyError('model') before, named as if the file were unreadable.
        raise UnreadableFileError("the --init file is a torch file but holds no model tensors", path=path,
                                  fix="pass a medfuse_fusion.safetensors export, a last.ckpt/best.ckpt, or a "
                                      "FusionNet state_dict saved with torch.save")
    return ck


def _unreadable_init(path: Path, exc: Exception) -> UnreadableFileError:
    if type(exc).__name__ == "UnpicklingError":
        # "(UnpicklingError)" alone did not say why a file torch wrote was refused.
        return UnreadableFileError("the --init file holds Python objects besides tensors, which are not loaded: "
                                   "unpickling them could run code", path=path,
                                   fix="pass a medfuse_fusion.safetensors export or a last.ckpt/best.ckpt, or save "
                                       "the tensors alone (torch.save(model.state_dict(), ...)) from code you trust")
    return UnreadableFileError(f"cannot read the --init weights ({type(exc).__name__})", path=path,
                               fix="pass a medfuse_fusion.safetensors export or a last.ckpt/best.ckpt")


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only`` (no code runs), without torch's own warnings about the file (a pickle
    protocol it "did not expect", asking to file an issue), which the typed error below says better."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


#: Run options a training checkpoint records (``state["options"]``) -> the architecture config key they set.
_CKPT_CONFIG = {"width": "width", "factor": "factor", "scan": "scan", "merge": "merge", "empty_guard": "empty_guard",
                "refine_head": "refine", "coarse_pixel_rule_3d": "coarse_pixel_rule_3d",
                "coarse_rule_learned": "coarse_rule_learned", "functional_k": "functional_k",
                "functional_base_learned": "functional_base_learned",
                "functional_coarse_learned": "functional_coarse_learned"}


def _checkpoint_config(path: Path) -> dict:
    """The architecture config of a training checkpoint, from the run options it records (values as strings);
    {} for a bare state dict or a checkpoint of a medfuse that did not record its options.

    Why: the config was read from safetensors exports only, so ``--init last.ckpt`` silently trained another
    model (factor 4 and no empty guard, pixel rule or functional choice, whatever the checkpoint's run used).
    """
    try:
        ck = _torch_load(path)  # weights_only: no unpickling
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a bad file
        raise _unreadable_init(path, exc) from None
    state = ck.get("state") if isinstance(ck, dict) else None
    options = state.get("options") if isinstance(state, dict) else None
    if not isinstance(options, dict):
        return {}
    out = {}
    for opt, key in _CKPT_CONFIG.items():
        value = options.get(opt)
        if value is None or value == "None":  # not recorded, or left to its default by that run
            continue
        out[key] = str(value)
    if options.get("per_input_gain") in ("True", "False"):
        out["per_input_gain"] = "1" if options["per_input_gain"] == "True" else "0"
    return out


def _init_config(path: Optional[Path]) -> dict:
    """The architecture config stored in ``--init`` weights (values as strings): a safetensors export's, or the
    one a training checkpoint's recorded run options give (:func:`_checkpoint_config`); else {}."""
    if path is None:
        return {}
    if not str(path).endswith(".safetensors"):
        return _checkpoint_config(Path(path)) if Path(path).is_file() else {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as fh:
            config = json.loads((fh.metadata() or {}).get("config", "{}"))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise _unreadable_init(path, exc) from None
    # Checked as load_model checks it: a list, or "x" for the factor, was an internal error (exit 3) further on.
    from .network import config_from_metadata

    try:
        if not isinstance(config, dict):
            raise TypeError("not a JSON object")
        config_from_metadata(config)
    except (TypeError, ValueError) as exc:
        raise UnreadableFileError(f"the --init weights' stored architecture config is malformed ({exc})", path=path,
                                  fix="pass a medfuse_fusion.safetensors export made by medfuse train, or a "
                                      "last.ckpt/best.ckpt") from None
    return config


def _init_guard(path: Optional[Path]) -> int:
    """The empty-input guard stored in ``--init`` weights (a safetensors export's config); 0 otherwise."""
    return int(_init_config(path).get("empty_guard", 0))


def _load_init(model, path: Optional[Path], tensors: Optional[dict] = None, *, warn: bool = False) -> None:
    """Load ``--init`` weights into ``model``; None: leave it. ``tensors``: :func:`_init_state` already read.

    Weights without a selective scan or a refinement head may start a model with one: it keeps its
    zero-initialised output, so the model starts as exactly the given weights. Weights with the other
    tri-plane merge ("conv" vs "convex") may start this one: the merge alone then starts from its initial
    value, the plain mean (said with a warning when ``warn``: the first of a run's loads, not every one).
    """
    if path is None:
        return
    tensors = _init_state(path) if tensors is None else tensors
    fix = _init_fix(model, path)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # tensor shapes differ
        lines = [ln.strip().rstrip(".") for ln in str(exc).splitlines() if "size mismatch" in ln] \
            or ["tensor shapes differ"]
        n = len(lines) if lines[0] != "tensor shapes differ" else 0
        more = f"; {n - 1} more tensor(s) differ" if n > 1 else ""
        raise InvalidInputError(f"the --init weights do not fit this architecture ({lines[0]}{more})", path=path,
                                fix=fix) from None
    merge_keys = {k for k in model.state_dict() if k.startswith("agg.")}
    if merge_keys and merge_keys <= set(missing) and all(k.startswith("agg.") for k in unexpected):
        unexpected = []  # the other merge's tensors: this model's merge keeps its initial value
        missing = [k for k in missing if not k.startswith("agg.")]
        # Said: a re-export with --epochs 0 --steps-3d 0 changed the shipped output by up to 0.49 without a word.
        ours = str(model.config().get("merge"))
        if warn:
            warnings.warn(f"the --init weights were trained with another tri-plane merge than this run's --merge "
                          f"{ours}: their merge is not used and this run's starts from the plain mean, so the model's "
                          "output differs from the weights' before any training; to fine-tune them as they are, pass "
                          "the --merge they were trained with (their JSON card's trained_by command)",
                          MedfuseWarning, stacklevel=2)
    if unexpected or any(not k.startswith(("scan.", "refine.")) for k in missing):
        parts = ([f"{len(missing)} tensor(s) missing from the file, e.g. {missing[:3]}"] if missing else []) + \
            ([f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}"] if unexpected else [])
        # A part the file has and this run's model lacks: its option, by name (a state dict records no settings,
        # and the generic list sent a user converting one to --width and --merge for a refinement head).
        parts_of = {"refine.": "--refine-head N (the file has a refinement head)",
                    "scan.": "--scan N (the file has a selective scan)"}
        named = [opt for prefix, opt in parts_of.items() if any(k.startswith(prefix) for k in unexpected)]
        raise InvalidInputError(f"the --init weights do not fit this architecture ({'; '.join(parts)})", path=path,
                                fix=("pass " + " and ".join(named) + "; " if named else "") + fix)


#: Architecture config keys that a training option sets and a fine-tune does not take from its --init file.
_ARCH_FLAGS = {"width": "--width", "per_input_gain": "--per-input-gain", "scan": "--scan", "merge": "--merge"}


def _init_fix(model, path: Path) -> str:
    """What to pass so that this run's model fits the ``--init`` weights: the options whose values differ from
    the file's stored config (a safetensors export), else the list of architecture options."""
    try:
        stored = _init_config(path)
    except UnreadableFileError:
        stored = {}
    ours = {k: str(v) for k, v in model.config().items()}
    defaults = {"per_input_gain": "0", "scan": "0"}  # config() leaves these out when off
    diff = []
    for key, flag in _ARCH_FLAGS.items():
        if key in stored or key in defaults:
            theirs = str(stored.get(key, defaults.get(key)))
            if theirs != ours.get(key, defaults.get(key)):
                if key == "per_input_gain":  # an on/off flag: "--per-input-gain 1" was refused by the parser
                    diff.append(f"{flag} (this run: without)" if theirs != "0" else f"no {flag} (this run: with)")
                else:
                    diff.append(f"{flag} {theirs} (this run: {ours.get(key, defaults.get(key))})")
    if diff:
        return "the file was trained with " + ", ".join(diff) + "; pass those options (the JSON card beside an " \
               "export records its trained_by command)"
    return "pass the --width/--per-input-gain/--scan/--merge the weights were trained with (the JSON card beside an " \
           "export records its trained_by command)"


#: Smallest training crop: the loss's 4-scale VIF filters ('valid' 17, 9, 5, 3 taps with two halvings) need 41.
MIN_CROP = 41


def _check_ranges(args: argparse.Namespace) -> None:
    """Numeric options out of range are usage errors before anything is read or written (they failed deep in
    torch or numpy before, as internal errors: a zero division, Adam's own check, a size mismatch)."""
    from .network import MAX_WIDTH

    inf = math.inf

    def weight(v, *, none_ok: bool = False) -> bool:  # a loss/score weight: finite and >= 0 (NaN fails)
        return (none_ok and v is None) or (v is not None and 0 <= v < inf)

    def finite(v) -> bool:  # a selection gate: any finite value (None: no gate)
        return v is None or -inf < v < inf

    for name, ok, bound, fix in (
            # Why "--steps-3d 0" too: --epochs 0 alone still runs the 3-D stage's --steps-3d (default 60) steps.
            ("epochs", args.epochs >= 0, "0 or more",
             "use 12 (the default), or 0 with --init and --steps-3d 0 to re-export weights unchanged"),
            # Why: numpy's seeding refused these deep in the run ("internal error"); threads below 1 became 1.
            ("seed", 0 <= args.seed <= 2 ** 32 - 1, "0..2**32-1", "use 0 (the default) or another seed in range"),
            ("threads", 1 <= args.threads <= MAX_THREADS, f"1..{MAX_THREADS}", "use 2 (the default), or 1"),
            ("steps_per_epoch", args.steps_per_epoch >= 1, "1 or more", "use 100 (the default)"),
            ("batch_size", args.batch_size >= 1, "1 or more", "use 6 (the default)"),
            ("val_limit", args.val_limit >= 1, "1 or more", "use 12 (the default)"),
            ("lr", 0 < args.lr < inf, "a finite value > 0", "use 1e-3 (the default)"),
            ("scan_lr", args.scan_lr is None or 0 < args.scan_lr < inf, "a finite value > 0",
             "leave it out (it is then --lr)"),
            # Within the bounds a weights file's settings are held to (FusionNet): wider was an internal error.
            ("width", 1 <= args.width <= MAX_WIDTH, f"1..{MAX_WIDTH}", "use 16 (the default)"),
            ("scan", 0 <= args.scan <= MAX_WIDTH, f"0..{MAX_WIDTH}", "use 0 (no scan) or 8"),
            ("steps_3d", args.steps_3d >= 0, "0 or more", "use 60 (the default), or 0 to skip the 3-D stage"),
            ("joint_3d_every", args.joint_3d_every >= 0, "0 or more", "use 5, or 0 for never"),
            ("val_fraction", 0 < args.val_fraction < 1, "between 0 and 1", "use 0.2 (the default)"),
            ("extra_fraction", 0 <= args.extra_fraction <= 1, "0..1", "use 0.15 (the default)"),
            ("three_input_fraction", 0 <= args.three_input_fraction <= 1, "0..1", "use 0.15, or 0 for none"),
            ("hot_spot_fraction", 0 <= args.hot_spot_fraction <= 1, "0..1", "use 0 (the default) .. 1"),
            ("ct_weight", 0 <= args.ct_weight < inf, "a finite value >= 0", "use 1 (the default) or 2"),
            # Loss and score weights: NaN/inf gave NaN losses and exported NaN weights; a negative one quietly
            # trained against its own term.
            ("vif_weight", weight(args.vif_weight), "a finite value >= 0", "use 1 (the default) or 0.8"),
            ("ssim_weight", weight(args.ssim_weight), "a finite value >= 0", "use 0.5 (the default) or 1"),
            ("qabf_weight", weight(args.qabf_weight), "a finite value >= 0", "use 1 (the default)"),
            ("ct_vif_weight", weight(args.ct_vif_weight, none_ok=True), "a finite value >= 0",
             "leave it out (it is then --vif-weight)"),
            ("ct_ssim_weight", weight(args.ct_ssim_weight, none_ok=True), "a finite value >= 0",
             "leave it out (it is then --ssim-weight)"),
            ("ct_qabf_weight", weight(args.ct_qabf_weight, none_ok=True), "a finite value >= 0",
             "leave it out (it is then --qabf-weight), or use 4"),
            ("ct_gff_weight", weight(args.ct_gff_weight), "a finite value >= 0", "use 0 (the default) or 10"),
            ("ct_target_weight", weight(args.ct_target_weight), "a finite value >= 0", "use 0 (the default) or 1"),
            ("ct_target_iters", args.ct_target_iters >= 1, "1 or more", "use 150 (the default)"),
            ("ct_target_smooth", args.ct_target_smooth >= 0, "0 or more", "use 0 (free teachers), 3, 5 or 7"),
            ("plane_weight", weight(args.plane_weight), "a finite value >= 0", "use 0 (the default) or 10"),
            ("hot_spot_weight", weight(args.hot_spot_weight), "a finite value >= 0", "use 0 (the default) or 5"),
            ("logit_cap", weight(args.logit_cap, none_ok=True), "a finite value >= 0",
             "leave it out (no cap), or use 0.5"),
            ("logit_penalty", weight(args.logit_penalty), "a finite value >= 0", "use 1e-4 (the default)"),
            ("select_ct_qabf", weight(args.select_ct_qabf), "a finite value >= 0", "use 0 (the default) or 2"),
            ("select_ct_ssim", weight(args.select_ct_ssim), "a finite value >= 0", "use 0 (the default)"),
            ("select_min_ct_mi", finite(args.select_min_ct_mi), "a finite value", "leave it out for no MI gate"),
            ("select_min_parts", finite(args.select_min_parts), "a finite value", "use 0.70, or leave it out"),
            ("select_max_plane_gap", weight(args.select_max_plane_gap, none_ok=True), "a finite value >= 0",
             "use 0.068, or leave it out"),
            ("max_minutes", args.max_minutes is None or args.max_minutes > 0, "more than 0",
             "leave it out for no time limit"),
            ("max_steps", args.max_steps is None or args.max_steps >= 1, "1 or more",
             "leave it out for no step limit")):
        if not ok:  # comparisons with NaN are False, so NaN lands here too
            raise InvalidInputError(f"--{name.replace('_', '-')} must be {bound}, got {getattr(args, name)}", fix=fix)
    if args.crop < MIN_CROP or args.crop % args.factor:  # the network's learned part works on factor-sized blocks
        raise InvalidInputError(f"--crop must be at least {MIN_CROP} (the loss's VIF filters) and a multiple of "
                                f"--factor {args.factor}, got {args.crop}",
                                fix="use 160 (the default) or 64 for short test runs")


#: What a run writes into its --run-dir (an export there too when --out is the run folder, as stage 1's is).
RUN_FILES = ("train.log", "last.ckpt", "best.ckpt", "last.tmp", "best.tmp", "ct_targets.npz", "export",
             "metrics.csv") + EXPORT_FILES


def _foreign_files(run_dir: Path) -> List[str]:
    """Names in an existing ``run_dir`` that no training run writes (temporary files of atomic writes aside)."""
    if not run_dir.is_dir():
        return []
    # Hidden names aside: the atomic writes' temporaries, a desktop's .DS_Store.
    return sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES and not p.name.startswith("."))


def _from_best(last: Path) -> str:
    """The fix's part that keeps a run's best epoch when its ``last.ckpt`` is missing or unreadable ("" without
    a ``best.ckpt`` beside it)."""
    best = Path(last).with_name("best.ckpt")
    if Path(last).name != "last.ckpt" or not best.is_file():
        return ""
    return f", or start a new run from its best epoch's weights: --init {best} with another --run-dir"


def _check_run_folder(args: argparse.Namespace) -> None:
    """Refuse what would silently lose or mix up a run: an earlier run's checkpoints replaced (or, with
    ``--epochs 0``, exported as this run's), a ``--resume`` that has nothing to resume, existing weights replaced."""
    for flag, folder in (("--run-dir", args.run_dir), ("--out", args.out)):
        if folder.exists() and not folder.is_dir():  # mkdir failed with a bare FileExistsError, --out after training
            raise OutputExistsError(f"{flag} names an existing file, and a folder goes there", path=folder,
                                    fix=f"pass a new or existing folder as {flag}")
    foreign = _foreign_files(args.run_dir)
    if foreign and not args.overwrite:
        raise OutputExistsError(f"--run-dir is a folder that holds other files than a training run's (e.g. "
                                f"{foreign[0]}), which it would mix with this run's checkpoints and log",
                                path=args.run_dir,
                                fix="pass a new or empty --run-dir, or --overwrite to write the run there anyway "
                                    "(other files are never deleted)")
    last, best = args.run_dir / "last.ckpt", args.run_dir / "best.ckpt"
    if args.resume and not last.exists():
        if best.exists():  # a fine-tune's epoch 0, a kill in epoch 1 between best.ckpt and last.ckpt, or removed
            raise InvalidInputError("--resume continues the run in --run-dir from its last.ckpt, and there is none, "
                                    "only best.ckpt (the run stopped before its first epoch ended, or last.ckpt was "
                                    "removed)", path=args.run_dir,
                                    fix="start the run again with --overwrite instead of --resume" + _from_best(last))
        raise InvalidInputError("--resume continues the run in --run-dir from its last.ckpt, and there is none",
                                path=args.run_dir,
                                fix="drop --resume to start a new run there, or pass the --run-dir of the run to "
                                    "continue")
    if not args.resume and not args.overwrite and (last.exists() or best.exists()):
        raise OutputExistsError("the run folder holds an earlier run's checkpoints", path=args.run_dir,
                                fix="pass --resume to continue that run, --overwrite to start a new one in its "
                                    "place, or another --run-dir")
    if args.epochs == 0 and args.init is None and not args.resume:
        raise InvalidInputError("--epochs 0 trains nothing, and there are no weights to export (no --init, no "
                                "--resume)",
                                fix="pass --init WEIGHTS --steps-3d 0 to re-export given weights, --resume to export the run in "
                                    "--run-dir, or --epochs 1 or more")
    _check_export(args.out, overwrite=args.overwrite)


def _command_of(args: argparse.Namespace) -> str:
    """The ``medfuse train ...`` command that re-runs this training (recorded as ``trained_by``)."""
    argv = getattr(args, "argv", None)  # set by main() and by the ``medfuse train`` CLI
    if argv is None:  # run() called from Python: the options that differ from their defaults
        argv = []
        for act in add_arguments(argparse.ArgumentParser(add_help=False))._actions:
            value = getattr(args, act.dest, act.default)
            if value == act.default:
                continue
            if isinstance(act, argparse._StoreTrueAction):
                argv.append(act.option_strings[-1])
            else:
                argv += [act.option_strings[-1], str(value)]
    return "medfuse train " + shlex.join(str(a) for a in argv)


#: Seconds between two redraws of the epoch bar at least, as the command line's bars (``cli._Bar.MIN_INTERVAL``).
BAR_MIN_INTERVAL = 0.5


def _tqdm():
    """tqdm's class, or None where a bad ``TQDM_*`` setting (``TQDM_NCOLS=abc``) makes tqdm's import itself fail
    with a ValueError: the run then goes on without a bar instead of stopping on tqdm's traceback, as the command
    line's bars do."""
    try:
        from tqdm import tqdm
    except (ValueError, TypeError):
        return None
    return tqdm


class _NoBar:
    """An epoch's steps without a bar (:func:`_epoch_bar` where tqdm cannot be imported)."""

    def __init__(self, steps: Sequence[int]):
        self._steps = steps

    def __iter__(self):
        return iter(self._steps)

    def set_postfix(self, **_: Any) -> None:
        """Nothing to show it on."""


def _epoch_bar(steps: Sequence[int], desc: str, *, quiet: bool = False, file: Any = None):
    """The tqdm bar over an epoch's ``steps`` on ``file`` (stderr): drawn only where the command line's bars are.

    No bar under ``quiet`` (``medfuse -q train``), when ``file`` is not a terminal (``disable=None``: a log file got
    hundreds of carriage-return updates per epoch), or when the environment turns bars off (``MEDFUSE_NO_PROGRESS``,
    ``TQDM_DISABLE``, ``TERM=dumb``: :func:`medfuse.progress.text_bar_allowed`, which ``python -m
    medfuse.fusion.train`` ignored). Redrawn at most every :data:`BAR_MIN_INTERVAL` seconds (tqdm's 0.1 s read as
    ten lines a second on a screen reader), ``#`` blocks where the locale cannot show the Unicode ones. The epoch
    lines and tables go to stdout and ``train.log`` either way.
    """
    from ..progress import text_bar_allowed, text_bar_ascii

    tqdm = _tqdm()
    if tqdm is None:
        return _NoBar(steps)
    file = sys.stderr if file is None else file
    return tqdm(steps, desc=desc, leave=False, file=file, disable=True if quiet or not text_bar_allowed() else None,
                mininterval=BAR_MIN_INTERVAL, ascii=text_bar_ascii(file))


def amp_settings(device: str):
    """(autocast on, its dtype, loss scaling on) for a resolved ``device``.

    Mixed precision on every CUDA device (``"cuda:1"`` too: it was compared with ``"cuda"`` alone and ran in
    fp32). bf16 has fp32's exponent range, so its gradients do not underflow and need no loss scaling; the
    scaler's state was not checkpointed either, so with it a resumed GPU run restarted the scale at 2**16.
    """
    import torch

    amp = str(device).startswith("cuda")
    return amp, torch.bfloat16, False


def run(args: argparse.Namespace) -> int:
    """Train, validate each epoch, export the weights. Returns a process exit code.

    One run at a time per ``--run-dir``: an OS lock beside it (``.<run-dir name>.train.lock``) is held from the
    option checks to the export. Why: two runs started on one folder both trained, mixed their lines in
    train.log, replaced each other's checkpoints and metrics, and could export the other run's best weights under
    their own card.

    Raises:
        OutputExistsError: another ``medfuse train`` holds the run folder (and as :func:`_run`).
    """
    from .._runlock import run_lock

    # Resolved: "--run-dir ." from inside the folder, a link or a ".." name the same folder, and one lock.
    run_dir = Path(os.path.realpath(os.path.expanduser(os.fspath(args.run_dir))))

    def busy(holder: str) -> Exception:
        return OutputExistsError(f"another medfuse train run is using this run folder ({holder})", path=run_dir,
                                 fix="wait for it to end, or pass another --run-dir")

    kept: dict = {}
    try:
        with run_lock(run_dir.parent / f".{run_dir.name}.train.lock", busy=busy):
            return _run(args, kept)
    except (CancelledError, KeyboardInterrupt) as e:
        # The command line's cancel message said "cancelled" alone: whether anything was kept, and how to go on.
        e.note = _cancel_note(args, kept)
        raise
    finally:
        # train.log was closed only at a run's end: a cancelled or failed run left it open (a ResourceWarning, at
        # whatever later point the collector ran, which another test once caught as its own warning).
        if kept.get("log") is not None:
            kept["log"].close()


def _cancel_note(args: argparse.Namespace, kept: dict) -> str:
    """What a cancelled training run kept, for the command line's cancel message."""
    if args.resume and "epoch" not in kept:
        # Before the checkpoint was read: "start again with --overwrite" would have deleted the earlier run's.
        return ("the run folder's checkpoints are as they were: the same command (with --resume) goes on from "
                "them")
    if "folder" not in kept:
        return "nothing was written (the run had not started training)"
    done, total = kept.get("epoch", 0), args.epochs
    where = f"in {kept['folder']}"
    if not done:
        earlier = any((Path(kept["folder"]) / n).exists() for n in ("last.ckpt", "best.ckpt"))
        return (f"no epoch had ended, so no checkpoint of it was saved {where} (train.log says how far it got); "
                "start again with the same command" + (" and --overwrite" if earlier else ""))
    if kept.get("export"):
        return f"the weights had been exported ({kept['export']}) before the cancel"
    rest = "the 3-D stage and the export" if args.steps_3d else "the export"
    stage = (f"epoch {done} of {total} had ended" if done < total
             else f"all {total} epochs had ended; {rest} had not")
    return (f"{stage}: its checkpoints (last.ckpt, best.ckpt) and metrics.csv are {where}; no weights were exported; "
            "the same command with --resume goes on from there")


def _run(args: argparse.Namespace, kept: Optional[dict] = None) -> int:
    """:func:`run` under the run folder's lock; ``kept`` is filled in with what the run has saved so far (the run
    folder once made, the epochs checkpointed, the export), for the cancel message."""
    kept = {} if kept is None else kept
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        from ..errors import MissingDependencyError

        raise MissingDependencyError.for_package(exc.name or "torch", "medfuse train", "ml") from None

    from .network import MAX_WIDTH, FusionNet

    trained_by = _command_of(args)  # before the defaults below are filled in from --init
    quiet = bool(getattr(args, "quiet", False))  # ``medfuse -q train``: the log file only
    if args.init is not None and str(args.init) == SHIPPED and not Path(args.init).exists():
        # Why: the README's "--init medfuse/fusion/weights/medfuse_fusion.safetensors" works from the repository
        # root only; "shipped" names the installed package's file from anywhere.
        from .infer import default_weights_path

        args.init = default_weights_path()
    if args.out is None:  # never the shipped weights by default: the run's own folder
        args.out = args.run_dir / "export"
    if args.ct_target_weight and args.ct_target_kind == "mixing" and args.init is None:
        raise InvalidInputError("--ct-target-kind mixing looks for teachers among the outputs of the starting "
                                "weights, and no --init was given",
                                fix="pass --init WEIGHTS (for example --init shipped, the shipped weights) or "
                                    "use --ct-target-kind pixels")
    init_cfg = _init_config(args.init)  # read once: a fine-tune keeps what it does not override
    if args.empty_guard is None:  # its starting weights' guard
        args.empty_guard = int(init_cfg.get("empty_guard", 0))
    if args.factor is None:  # the resolution of the learned part
        args.factor = int(init_cfg.get("factor", 4))
    if args.factor not in (1, 2, 4, 8):
        raise InvalidInputError(f"--factor must be 1, 2, 4 or 8, got {args.factor}",
                                fix="use 4 (the learned maps at 1/4 resolution) or 2 (finer maps, about 2x slower)")
    if not 0 <= args.qabf_grad_softness < math.inf:  # also catches NaN (and inf: a NaN gradient)
        raise InvalidInputError(f"--qabf-grad-softness must be 0 or more, got {args.qabf_grad_softness}",
                                fix=f"use {ANGLE_GRAD_SOFTNESS:g} (the default), or 0 for the exact gradient")
    if args.refine_head is None:  # and the 2-D path's full-resolution refinement head
        args.refine_head = int(init_cfg.get("refine", 0))
    if not 0 <= args.refine_head <= MAX_WIDTH:
        raise InvalidInputError(f"--refine-head must be 0..{MAX_WIDTH}, got {args.refine_head}",
                                fix="use 8 (the shipped weights' value) or 0 for no refinement head")
    if args.train_only_refine and not (args.refine_head and args.init is not None):
        raise InvalidInputError("--train-only-refine trains the refinement head on top of given weights, and "
                                "there is no head or no --init",
                                fix="pass --init WEIGHTS and --refine-head 8")
    if args.coarse_pixel_rule_3d is None:  # likewise the 3-D path's coarse pixel rule
        args.coarse_pixel_rule_3d = int(init_cfg.get("coarse_pixel_rule_3d", 0))
    if not 0 <= args.coarse_pixel_rule_3d <= 3:
        raise InvalidInputError("--coarse-pixel-rule-3d must be 0..3 (detail levels), "
                                f"got {args.coarse_pixel_rule_3d}",
                                fix="use 2 (the shipped weights' value: d2 and d3), or 0 for the learned choice")
    # The float config values: absent from the --init file means FusionNet's default (the rule's nudge and the
    # functional-volume choice off).
    for name, default, finite, fix in (
            ("coarse_rule_learned", 0.0, 1.0, "use 0.005 (the shipped weights' value), or 0 for the pixel rule alone"),
            ("functional_k", 0.0, math.inf, "use 30 (the shipped weights' value), or 0 to turn it off"),
            ("functional_base_learned", 0.1, 1.0, "use 0.1 (the shipped weights' value)"),
            ("functional_coarse_learned", 0.0075, 1.0, "use 0.0075 (the shipped weights' value)")):
        if getattr(args, name) is None:
            setattr(args, name, float(init_cfg.get(name, default)))
        value = getattr(args, name)
        if not 0.0 <= value <= finite or value == math.inf:  # also catches NaN
            bound = "0..1" if finite == 1.0 else "a finite value >= 0"
            raise InvalidInputError(f"--{name.replace('_', '-')} must be {bound}, got {value}", fix=fix)
    if not 0 <= args.empty_guard <= 63 or (args.empty_guard and args.empty_guard % 2 == 0):
        raise InvalidInputError("--empty-guard must be 0 or an odd neighbourhood size up to 63, got "
                                f"{args.empty_guard}",
                                fix="use 3 (the shipped weights' value), 5, 7, or 0 to turn the guard off")
    if args.ct_target_smooth > 1 and args.ct_target_smooth % 2 == 0:
        raise InvalidInputError(f"--ct-target-smooth must be an odd box size, got {args.ct_target_smooth}",
                                fix="use 3, 5 or 7 (or 0 for free teachers)")
    _check_ranges(args)
    _check_run_folder(args)

    def new_model(scan: int = args.scan):  # the trained model and a mixing teacher share the architecture
        return FusionNet(width=args.width, factor=args.factor, per_input_gain=int(args.per_input_gain), scan=scan,
                         empty_guard=args.empty_guard, merge=args.merge,
                         coarse_pixel_rule_3d=args.coarse_pixel_rule_3d,
                         coarse_rule_learned=args.coarse_rule_learned, refine=args.refine_head,
                         functional_k=args.functional_k, functional_base_learned=args.functional_base_learned,
                         functional_coarse_learned=args.functional_coarse_learned)

    resume_notes = check_resume_options(args, args.run_dir / "last.ckpt") if args.resume else []
    from .device import resolve_device

    device = resolve_device(args.device)
    amp, amp_dtype, scale_loss = amp_settings(device)
    # The data is listed, split and read before the run folder is made: a missing folder or a broken PNG leaves
    # nothing behind.
    if args.data is None:
        raise InvalidInputError("medfuse train needs the training data: pass --data DATA",
                                fix=f"pass --data DATA where the layout is {LAYOUT}")
    hv = Path(args.data) / "harvard-pairs"
    pairs = harvard_pairs(hv)
    train_pairs, val_pairs = split_cases(pairs, seed=args.seed, val_fraction=args.val_fraction)
    _check_split(train_pairs, val_pairs, hv)
    split = split_of(train_pairs, val_pairs)  # recorded in every checkpoint: a resume on another split is refused
    if args.resume:
        resume_notes += check_resume_split(args.run_dir / "last.ckpt", split)
    fingerprint = data_fingerprint(pairs, hv)  # the data's identity: card, checkpoints, the --init check
    overlap = init_val_overlap(args.init, split["val"], fingerprint=fingerprint)
    same_data = init_same_data(args.init, fingerprint)
    if args.ct_target_weight and "CT-MRI" not in train_pairs:
        raise InvalidInputError("--ct-target-weight pulls CT-MRI batches towards teacher images, and the data has "
                                "no CT-MRI pairs", path=hv, fix="drop --ct-target-weight, or add CT-MRI/ pairs")
    read_pairs(val_pairs)  # validate() reads them again each epoch; here only to fail early
    train_arrays = read_pairs(train_pairs)
    check_volume_folders(Path(args.data))  # a half-copied volume folder: refused before the run folder is made
    vols = volumes_in(Path(args.data))
    # --init too: read (once: teacher and model) and fitted to this run's architecture before the run folder is
    # made, so a wrong file or architecture option leaves no run folder behind (it left train.log before).
    init_tensors = None if args.init is None else _init_state(args.init)
    if init_tensors is not None:
        _load_init(new_model(), args.init, init_tensors, warn=True)

    t0 = time.time()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)  # 1..MAX_THREADS: _check_ranges
    args.run_dir.mkdir(parents=True, exist_ok=True)
    kept["folder"] = args.run_dir
    logf = open(args.run_dir / "train.log", "a", encoding="utf-8")
    kept["log"] = logf  # closed by run() whatever happens

    tqdm = _tqdm()

    def log(msg: str, *, console: bool = True) -> None:
        if console and not quiet:
            (print if tqdm is None else tqdm.write)(msg)  # tqdm.write: not through an epoch bar being drawn
        logf.write(msg + "\n")
        logf.flush()

    def warn(note: str) -> None:
        # Shown once, as a warning (the command line prints it as one line); train.log keeps it too.
        warnings.warn(note, MedfuseWarning, stacklevel=user_stacklevel())
        log("WARNING: " + note, console=False)

    for note in resume_notes:
        warn(note)
    if _replaces_shipped(args.out):  # only with --overwrite: _check_run_folder refused it otherwise
        warn(f"--out {args.out} --overwrite replaces the weights shipped with medfuse when the run ends; copy "
             "medfuse_fusion.safetensors and medfuse_fusion.json from there first to keep them (in a git checkout, "
             "'git checkout -- medfuse/fusion/weights' restores them; else reinstall medfuse)")
    absent = [t for t in PAIR_TYPES if t not in train_pairs]
    if absent:  # your own data may hold one pair type only; say what the run trains on
        log(f"pair types: {', '.join(train_pairs)} ({', '.join(absent)} absent from {hv})")
    log(f"train pairs {sum(map(len, train_pairs.values()))}, val pairs {sum(map(len, val_pairs.values()))}; "
        f"val cases " + json.dumps(split["val"]))
    if overlap:
        init_rec = _init_record(args.init) or {}
        theirs = (f"--seed {init_rec.get('seed')} --val-fraction {init_rec.get('val_fraction')}"
                  if init_rec.get("seed") is not None and init_rec.get("val_fraction") is not None
                  else "their card's seed and val_fraction")
        note = ("the --init weights were not held out from these validation cases of this run (its --data holds "
                "the files they were trained on, and their card's val_cases leave these out, so they trained on "
                "them): " + "; ".join(f"{k} {', '.join(v)}" for k, v in overlap.items())
                + ". Validation and the choice of the exported epoch (the --init weights compete as epoch 0) are "
                "optimistic there; the export's card records them as init_val_overlap. Pass the split the --init "
                f"weights were trained with ({theirs}) to validate on held-out cases only")
        warn(note)
    other_data = [t for t, same in same_data.items() if not same]
    if other_data:
        # Why not a warning: the case names of other data say nothing of what the weights saw.
        log(f"note: --data's {', '.join(other_data)} pairs are not the files the --init weights were trained on "
            "(their data fingerprints differ), so whether these validation cases were held out from those "
            "weights cannot be told from the names; nothing is compared")
    found = [n for n in ("brats-gli-00001", "spm12-templates") if (Path(args.data) / n).is_dir()]
    log(f"3-D volume sets: {len(vols)} (from {', '.join(found) or 'no volume folder'} in {args.data}, "
        f"and the phantom)")
    targets = None
    if args.ct_target_weight:
        from .targets import anchor_targets

        teacher = None
        if args.ct_target_kind == "mixing":
            # The teacher frees the starting weights' own maps, so it is their architecture.
            has_scan = any(k.startswith("scan.") for k in init_tensors)
            teacher = new_model(scan=args.scan if has_scan else 0)
            _load_init(teacher, args.init, init_tensors)
        targets = {"CT-MRI": anchor_targets(train_pairs["CT-MRI"], ptype="CT-MRI", iters=args.ct_target_iters,
                                            model=teacher, smooth=args.ct_target_smooth,
                                            cache=args.run_dir / "ct_targets.npz", log=log)}
    sampler = _Sampler(train_pairs, vols, crop=args.crop, seed=args.seed, extra_fraction=args.extra_fraction,
                       type_weights={"CT-MRI": args.ct_weight}, three_input_fraction=args.three_input_fraction,
                       targets=targets, hot_spot_fraction=args.hot_spot_fraction, loaded=train_arrays)

    model = new_model().to(device)
    captured: list = []  # selection-head outputs of the current step, for the --logit-cap penalty
    if args.logit_cap is not None:
        # Training passes only: validation runs in eval mode and would otherwise pile up its logits here.
        model.select.register_forward_hook(lambda m, _i, out: captured.append(out) if m.training else None)
    if args.train_only_refine:
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("refine."))
    scan_params = [p for n, p in model.named_parameters() if n.startswith("scan.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("scan.") and p.requires_grad]
    groups = [{"params": rest}] + ([{"params": scan_params, "lr": args.scan_lr or args.lr}] if scan_params else [])
    opt = torch.optim.Adam(groups, lr=args.lr)
    loss_fn = MetricLoss(vif_weight=args.vif_weight, ssim_weight=args.ssim_weight, qabf_weight=args.qabf_weight,
                         angle_grad_softness=args.qabf_grad_softness, zero_angle=args.qabf_zero_angle)
    options = run_options(args)  # in every checkpoint: a --resume with other options is refused
    state = {"epoch": 0, "history": [], "elapsed_s": 0.0, "options": options, "epochs": args.epochs, "cases": split,
             "data_fingerprint": fingerprint, "command": trained_by}
    if args.init is not None:
        _load_init(model, args.init, init_tensors)
        log(f"initialised from {args.init}")
    ckpt = args.run_dir / "last.ckpt"
    if args.overwrite and not args.resume:
        # Why: a stale last.ckpt would be resumed later as this run's, a stale best.ckpt exported as its best.
        for old in (ckpt, args.run_dir / "best.ckpt", args.run_dir / METRICS_FILE):
            if old.exists():
                old.unlink()
                log(f"--overwrite: removed the earlier run's {old}")
    rng3 = np.random.default_rng(args.seed + 5)
    if args.resume:  # _check_run_folder made sure there is a last.ckpt
        state = load_checkpoint(ckpt, model, opt)
        if "rng" in state:
            try:
                set_rng_state(sampler, rng3, state["rng"])
            except (ValueError, TypeError, RuntimeError, IndexError, KeyError):  # saved by another medfuse/MONAI
                raise InvalidInputError("the checkpoint's random-number states do not fit this version's data "
                                        "pipeline", path=ckpt,
                                        fix="start a new run with --overwrite or another --run-dir") from None
        else:  # a checkpoint from before the random states were saved: a fresh, still deterministic stream
            sampler.rng = np.random.default_rng(args.seed + 1000 * state["epoch"])
            rng3 = np.random.default_rng(args.seed + 5 + 1000 * state["epoch"])
        log(f"resumed from {ckpt} at epoch {state['epoch']}")
        kept["epoch"] = state["epoch"]
        short = state["epoch"] * args.steps_per_epoch - state.get("steps_done", state["epoch"] * args.steps_per_epoch)
        if short > 0:
            log(f"note: the run stopped {short} step(s) short of its epoch {state['epoch']} (--max-minutes or "
                "--max-steps); it "
                f"goes on with epoch {state['epoch'] + 1} and the learning rate of the steps it did take")
    scaler = torch.amp.GradScaler("cuda", enabled=scale_loss)
    total_steps = args.epochs * args.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total_steps)))))
    with warnings.catch_warnings():  # fast-forwarding the schedule before any optimizer step is intended here
        warnings.simplefilter("ignore", UserWarning)
        # The steps taken, not epochs x steps: an epoch cut short by --max-minutes took fewer, and resuming
        # after it skipped the schedule ahead by the steps it never took.
        for _ in range(state.get("steps_done", state["epoch"] * args.steps_per_epoch)):
            sched.step()
    base_elapsed = state.get("elapsed_s", 0.0)

    val_rules = MARGIN_RULES if args.select_by_margin else ("max",)
    rule_cache: dict = {}  # the rules' validation rows are the same every epoch

    def score_of(table) -> float:
        ct = table.get("CT-MRI", {}).get("network", {})
        if args.select_by_margin:
            return rule_margin(table) - 100.0 * (not gates_ok(ct))
        s = selection_score(table, ct_qabf=args.select_ct_qabf, ct_ssim=args.select_ct_ssim)
        return s - 100.0 * (not gates_ok(ct))  # an epoch that misses a required probe never wins

    def gates_ok(ct) -> bool:
        ok = True
        if args.select_min_ct_mi is not None:
            ok &= ct.get("MI", 0.0) >= args.select_min_ct_mi
        if args.select_min_parts is not None:
            p = parts_probe(model, device=device)
            log(f"parts probe {p:.3f} (need >= {args.select_min_parts})")
            ok &= p >= args.select_min_parts
        if args.select_max_plane_gap is not None:
            g = plane_probe(model, device=device)
            log(f"through-plane probe {g:.3f} (need <= {args.select_max_plane_gap})")
            ok &= g <= args.select_max_plane_gap
        return ok

    if args.init is not None and state["epoch"] == 0:
        # Fine-tuning: the starting weights compete as "epoch 0", so the export is never worse by the score.
        check_finite(model, "the --init weights")
        table = validate(model, val_pairs, device=device, limit=args.val_limit, rules=val_rules,
                         rule_cache=rule_cache)
        state.update(best_score=score_of(table), best_epoch=0)
        state["history"] = [{"epoch": 0, "table": table, "score": float(state["best_score"])}]
        save_checkpoint(args.run_dir / "best.ckpt", model, opt, state)
        write_metrics(args.run_dir, state["history"])
        log("epoch 0 (the --init weights)\n" + format_table(table) + f"\nscore {state['best_score']:.4f}")
    stop = False
    for epoch in range(state["epoch"], args.epochs):
        if args.max_steps and state.get("steps_done", epoch * args.steps_per_epoch) >= args.max_steps:
            log(f"stopping the 2-D stage: --max-steps {args.max_steps} reached")  # a resume past them
            break
        bar = _epoch_bar(range(args.steps_per_epoch), f"epoch {epoch + 1}/{args.epochs}", quiet=quiet)
        run_loss = []
        steps_before = state.get("steps_done", epoch * args.steps_per_epoch)  # the run's steps before this epoch
        for step_i in bar:
            x = torch.from_numpy(sampler.batch(args.batch_size)).to(device)
            captured.clear()
            with torch.autocast(device_type="cuda", dtype=amp_dtype, enabled=amp):
                fused = model(x)
            is_ct = sampler.last_type == "CT-MRI"
            loss, parts = loss_fn(fused, x, qabf_weight=args.ct_qabf_weight if is_ct else None,
                                  vif_weight=args.ct_vif_weight if is_ct else None,
                                  ssim_weight=args.ct_ssim_weight if is_ct else None)
            if args.joint_3d_every and vols and step_i % args.joint_3d_every == 0:
                # Why: 2-D-only fine-tuning lets the tri-plane output grow rough across slices; a 3-D patch
                # loss (with the through-plane term) now and then keeps the planes consistent.
                x3 = _patch_3d(vols, rng3, device)
                if x3 is not None:
                    l3, _ = loss_3d(model, x3, loss_fn, plane_weight=args.plane_weight,
                                    slices=not args.joint_3d_plane_only)
                    loss = loss + l3
            if sampler.last_target is not None:
                # Why: per-image optimised teachers pass both CT-MRI anchors; the network can only follow
                # their selection (it mixes its inputs), so this moves the selection maps, not the pixels.
                t = torch.from_numpy(sampler.last_target).to(device)
                loss = loss + args.ct_target_weight * (fused.float() - t).abs().mean()
            if is_ct and args.ct_gff_weight:
                # Why: metric losses keep the network in its max-like basin; pulling CT-MRI outputs towards the
                # guided-filter rule starts them where per-pixel optimisation finds both anchors passed.
                loss = loss + args.ct_gff_weight * (fused.float() - gff_targets(x)).abs().mean()
            if sampler.last_spots is not None and args.hot_spot_weight:
                from .hotspots import hot_spot_loss

                loss = loss + args.hot_spot_weight * hot_spot_loss(fused, x, torch.from_numpy(sampler.last_spots)
                                                                   .to(device))
            if captured:
                loss = loss + args.logit_penalty * logit_excess(captured[0], x.shape[1], args.logit_cap)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # metric losses have sharp spots
            scaler.step(opt)
            scaler.update()
            step_lr = float(opt.param_groups[0]["lr"])  # the rate this step used (the schedule ends at 0)
            sched.step()
            run_loss.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(run_loss[-20:]):.4f}", q=f"{parts['Qabf']:.3f}", v=f"{parts['VIF']:.3f}")
            if args.max_minutes and (time.time() - t0) / 60 > args.max_minutes:
                stop = "--max-minutes"
                break
            if args.max_steps and steps_before + len(run_loss) >= args.max_steps:
                stop = "--max-steps"
                break
        # Why here: a diverged epoch ended in validate() as an internal error (sklearn's "Input contains NaN"),
        # and must never become best.ckpt (the export) or last.ckpt.
        check_finite(model, f"epoch {epoch + 1}")
        table = validate(model, val_pairs, device=device, limit=args.val_limit, rules=val_rules,
                         rule_cache=rule_cache)
        elapsed = base_elapsed + time.time() - t0
        log(f"epoch {epoch + 1}: train loss {np.mean(run_loss):.4f}, {elapsed / 60:.1f} min\n" + format_table(table))
        streams = rng_state(sampler, rng3)  # before the probes of score_of, as it always was
        val_score = score_of(table)
        if args.select_by_margin:
            per = ", ".join(f"{k} {v:+.4f}" for k, v in rule_margins(table).items())
            log(f"worst relative margin over the rules: {rule_margin(table):+.4f} ({per}; score {val_score:.4f})")
        entry = {"epoch": epoch + 1, "table": table, "steps": len(run_loss), "train_loss": float(np.mean(run_loss)),
                 "lr": step_lr if run_loss else float(sched.get_last_lr()[0]), "score": float(val_score), "elapsed_s": float(elapsed)}
        state = {"epoch": epoch + 1, "history": state["history"] + [entry],
                 "elapsed_s": elapsed, "best_score": state.get("best_score", -1e9), "best_epoch": state.get("best_epoch"),
                 "rng": streams, "options": options, "epochs": args.epochs, "cases": split,
                 "data_fingerprint": fingerprint, "command": state.get("command"),
                 "time_cut": bool(state.get("time_cut")) or stop == "--max-minutes",
                 "steps_done": state.get("steps_done", epoch * args.steps_per_epoch) + len(run_loss)}
        new_best = val_score > state["best_score"] or not (args.run_dir / "best.ckpt").exists()
        if new_best:
            state["best_score"], state["best_epoch"] = val_score, epoch + 1
            # best.ckpt before last.ckpt: a kill between the two leaves last.ckpt at the previous epoch, and the
            # resume redoes this one and finds the same best. last.ckpt first (as before) lost this best epoch for
            # good, and in a 1-epoch run left a last.ckpt whose resume failed for want of best.ckpt.
            save_checkpoint(args.run_dir / "best.ckpt", model, opt, state)
        save_checkpoint(ckpt, model, opt, state)
        write_metrics(args.run_dir, state["history"])
        kept["epoch"] = epoch + 1
        if new_best:
            log(f"new best epoch {epoch + 1}: score {val_score:.4f}")
        if stop == "--max-minutes":
            log(f"stopping the 2-D stage: --max-minutes reached after {state['steps_done']} step(s). A run cut by "
                "time is not reproducible across machines (a faster one takes more steps); the card records the "
                "steps taken (steps_2d). To repeat it elsewhere pass --max-steps "
                f"{state['steps_done']} instead of --max-minutes")
            break
        if stop:
            log(f"stopping the 2-D stage: --max-steps {args.max_steps} reached")
            break
    best = load_checkpoint(args.run_dir / "best.ckpt", model, None)
    log(f"exporting the best epoch ({best.get('best_epoch')})")
    if best.get("best_score", 0.0) < -50.0:  # the gate penalty: no epoch met every --select-min/max requirement
        log("WARNING: no epoch met the --select-min-*/--select-max-* requirements; the export misses them")
    steps_3d = args.steps_3d
    if args.train_only_refine and steps_3d:
        # The 3-D stage trains the tri-plane merge, which --train-only-refine promises to leave as --init gave it
        # (the 3-D path does not use the head).
        log(f"note: --train-only-refine skips the 3-D stage's {steps_3d} steps (--steps-3d): the tri-plane merge "
            "stays as --init gave it")
        steps_3d = 0
    if args.epochs == 0 and steps_3d and vols:  # the fix texts said "--epochs 0" alone re-exports --init
        log(f"note: --epochs 0 still runs the 3-D stage's {steps_3d} steps (--steps-3d); pass --steps-3d 0 "
            "to export the starting weights unchanged")
    _train_3d(model, vols, steps=steps_3d, device=device, loss_fn=loss_fn, seed=args.seed, log=log,
              plane_weight=args.plane_weight)
    check_finite(model, "the 3-D stage")  # before the final validation's minutes
    # A larger subset than each epoch's, not every pair: the full split would add minutes to every run.
    final_limit = 3 * args.val_limit
    scored = {k: len(spread(v, final_limit)) for k, v in val_pairs.items()}
    final = validate(model, val_pairs, device=device, limit=final_limit, rules=("max", "mean"))
    log(f"final validation (up to 3 x --val-limit = {final_limit} pairs per type: "
        + ", ".join(f"{k} {n} of {len(val_pairs[k])}" for k, n in scored.items()) + "):\n" + format_table(final))
    steps_2d = state.get("steps_done", state["epoch"] * args.steps_per_epoch)
    meta = {
        "trained_by": trained_by,
        # A resumed run's command is its --resume; the command that started it reproduces it.
        **({"started_by": state.get("command")} if args.resume and state.get("command") else {}),
        "seed": args.seed, "val_fraction": args.val_fraction, "epochs_done": state["epoch"], "best_epoch": best.get("best_epoch"), "wall_time_min": round((base_elapsed + time.time() - t0) / 60, 1),
        # The optimiser steps taken (an epoch cut by --max-minutes or --max-steps takes fewer), and whether a
        # time limit cut the run: then it is not reproducible on another machine.
        "steps_2d": steps_2d, "steps_3d": steps_3d if vols else 0,
        "cut_short": steps_2d < args.epochs * args.steps_per_epoch,
        "stopped_by_max_minutes": bool(state.get("time_cut")),
        **({"reproducible": "no: --max-minutes cut the 2-D stage, so the steps taken depend on the machine's speed; "
                            f"--max-steps {steps_2d} repeats it"} if state.get("time_cut") else {}),
        "threads": torch.get_num_threads(),
        "val_cases": split["val"],
        "data_fingerprint": fingerprint,
        # Validation cases the --init weights were not held out from (init_val_overlap); absent when none.
        **({"init_val_overlap": overlap} if overlap else {}),
        "validation": final, "validation_pairs": scored, "device": device, "torch": torch.__version__,
    }
    path = export_weights(model.cpu(), Path(args.out), meta, overwrite=args.overwrite)
    kept["export"] = path
    log(f"weights written to {path}")
    logf.close()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="medfuse train", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the recorded ``trained_by`` command
    try:
        return run(args)
    except MedfuseError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
